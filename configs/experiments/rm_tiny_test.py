"""A seconds-long reward-model run for tests, from scratch: a tiny model and a character
tokenizer on the preference pairs of --config.data.path, no normalising policy."""

from configs import base
from configs.experiments import rm_hh


def get_config():
  c = rm_hh.get_config()
  c.model = base.model_config("tiny", vocab_size=0, max_seq_len=32)
  c.data.path = ""  # set by the test
  c.data.val_fraction = 0.1
  c.data.tokenizer = "char"
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.rlhf.norm_policy = ""
  c.rlhf.norm_samples = 16
  c.rlhf.norm_tokens = 8
  c.train.init_from = ""
  c.train.steps = 20
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.eval_batches = 2
  c.train.checkpoint_every = 5
  c.train.tensorboard = False
  c.train.progress = False
  c.opt.lr = 3e-3
  c.opt.final_lr = 3e-4
  c.opt.warmup_steps = 2
  return c
