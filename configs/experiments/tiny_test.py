"""A seconds-long run for tests: a tiny model on the built-in corpus."""

from configs import base


def get_config():
  c = base.get_config()
  c.model = base.model_config("tiny", vocab_size=0, max_seq_len=32)
  c.data.vocab_size = 512
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.train.steps = 20
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.eval_batches = 2
  c.train.checkpoint_every = 5
  c.train.sample_tokens = 8
  c.train.tensorboard = False
  c.train.progress = False
  c.opt.lr = 3e-3
  c.opt.warmup_steps = 2
  return c
