"""LLaMA-style ~1.1B for GPUs: bf16 compute, scanned and rematerialised layers, FSDP.
train.peak_flops is one device's dense bf16 peak (989e12 for an H100 SXM); MFU multiplies
it by the device count."""

from configs import base


def get_config():
  c = base.get_config()
  c.model = base.model_config(
    "llama_1b",
    vocab_size=0,
    dtype="bfloat16",
    scan_layers=True,
    remat="dots",
    attention_impl="cudnn",
  )
  c.data.vocab_size = 32000
  c.data.seq_len = 2048
  c.data.batch_size = 16
  c.data.eval_batch_size = 16
  c.opt.lr = 3e-4
  c.opt.final_lr = 3e-5
  c.opt.warmup_steps = 2000
  c.mesh.layout = "fsdp"
  c.train.steps = 100000
  c.train.eval_every = 2000
  c.train.checkpoint_every = 1000
  c.train.peak_flops = 989e12
  return c
