"""GPT-2 small (124M) shape. Runs out of the box on the built-in corpus; for a real run set
data.corpus=shards and data.path to a directory made by `python -m data.prepare`."""
from configs import base


def get_config():
  c = base.get_config()
  c.model = base.model_config("gpt2_124m", vocab_size=0, dtype="bfloat16")
  c.data.vocab_size = 8192
  c.data.seq_len = 1024
  c.data.batch_size = 32
  c.data.eval_batch_size = 32
  c.opt.lr = 6e-4
  c.opt.final_lr = 6e-5
  c.opt.warmup_steps = 700
  c.opt.weight_decay = 0.1
  c.mesh.layout = "fsdp"
  c.train.steps = 20000
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  return c
