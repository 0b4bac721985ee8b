"""The demo run: a small LLaMA-style model on the built-in Shakespeare plays, BPE tokens."""

from configs import base


def get_config():
  c = base.get_config()
  c.model = base.model_config(
    "tiny",
    vocab_size=0,
    d_model=128,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    d_ff=384,
    max_seq_len=128,
    tie_embeddings=True,
  )
  c.data.corpus = "shakespeare"
  c.data.tokenizer = "bpe"
  c.data.vocab_size = 2048
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.data.eval_batch_size = 64
  c.opt.lr = 2e-3
  c.opt.final_lr = 2e-4
  c.opt.warmup_steps = 100
  c.opt.b2 = 0.99
  c.train.steps = 1200
  c.train.eval_every = 400
  c.train.eval_batches = 20
  c.train.checkpoint_every = 400
  c.train.sample_prompt = "ROMEO:\n"
  c.train.sample_tokens = 120
  return c
