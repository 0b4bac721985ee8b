"""A seconds-long SFT run for tests, from scratch: a tiny model and a character tokenizer on
the chats of --config.data.path."""

from configs import base
from configs.experiments import sft_shakespeare


def get_config():
  c = sft_shakespeare.get_config()
  c.model = base.model_config("tiny", vocab_size=0, max_seq_len=64)
  c.data.path = ""  # set by the test
  c.data.tokenizer = "char"
  c.data.seq_len = 64
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.data.eval_replies = 4
  c.data.reply_tokens = 8
  c.train.init_from = ""
  c.train.steps = 20
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.eval_batches = 2
  c.train.checkpoint_every = 5
  c.train.tensorboard = False
  c.train.progress = False
  c.opt.lr = 3e-3
  c.opt.warmup_steps = 2
  return c
