"""nanoGPT's default shakespeare_char shape: 6 layers, 6 heads, width 384, block 256."""
from configs.experiments import shakespeare_char


def get_config():
  c = shakespeare_char.get_config()
  c.model.d_model = 384
  c.model.n_layers = 6
  c.model.n_heads = 6
  c.model.n_kv_heads = 6
  c.model.d_ff = 1536
  c.model.max_seq_len = 256
  c.model.dropout = 0.2  # nanoGPT drops embeddings, residual branches and attention weights
  c.model.attention_dropout = 0.2
  c.data.seq_len = 256
  c.data.batch_size = 64
  c.data.eval_batch_size = 64
  c.train.steps = 5000
  c.train.eval_every = 500
  c.train.checkpoint_every = 1000
  return c
