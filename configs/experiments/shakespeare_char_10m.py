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
  # Memory: scanned layers that keep only their matmul outputs for the backward pass need
  # under half of the unscanned stack's peak (3.3 against 7.4 GiB on CPU). Hash masks are
  # computed inside the fusions that apply them: 9.1 s per step against 10.7 s with
  # RngBitGenerator masks (docs/benchmarks.md).
  c.model.scan_layers = True
  c.model.remat = "dots"
  c.model.dropout_prng = "hash"
  # Four query blocks skip the attention the causal mask zeroes: 7.6 -> 6.9 s per step.
  c.model.attention_query_blocks = 4
  c.distributed.xla_flags = ""  # YNNPACK's default fusions: its reductions win at this size
  # One CPU device: these matmuls keep both cores busy (two devices: 13.1 against 11.0 s/step).
  c.distributed.local_device_count = 0
  c.data.seq_len = 256
  c.data.batch_size = 64
  c.data.eval_batch_size = 64
  c.train.steps = 5000
  c.train.eval_every = 250  # nanoGPT's eval_interval
  c.train.checkpoint_every = 1000
  return c
