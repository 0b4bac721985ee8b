"""A seconds-long classification run for tests, from scratch: a tiny model and a character
tokenizer on the {text, label} records of --config.data.path."""

from configs import base
from configs.experiments import classify_texts


def get_config():
  c = classify_texts.get_config()
  c.model = base.model_config("tiny", vocab_size=0, max_seq_len=32)
  c.data.path = ""  # set by the test
  c.data.tokenizer = "char"
  c.data.seq_len = 32
  c.data.batch_size = 16
  c.data.eval_batch_size = 16
  c.train.init_from = ""
  c.train.steps = 150
  c.train.log_every = 10
  c.train.eval_every = 0
  c.train.checkpoint_every = 0
  c.train.tensorboard = False
  c.train.progress = False
  c.opt.lr = 3e-3
  c.opt.final_lr = 3e-4
  c.opt.warmup_steps = 10
  return c
