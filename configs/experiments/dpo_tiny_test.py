"""A seconds-long DPO run for tests, from scratch: a tiny model and a character tokenizer on the
preference pairs of --config.data.path; the reference is a copy of the random init."""

from configs import base
from configs.experiments import dpo_chat


def get_config():
  c = dpo_chat.get_config()
  c.model = base.model_config("tiny", vocab_size=0, max_seq_len=32)
  c.data.path = ""  # set by the test
  c.data.val_fraction = 0.1
  c.data.tokenizer = "char"
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.rlhf.beta = 0.5
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
