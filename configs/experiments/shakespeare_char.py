"""nanoGPT's CPU baby run of shakespeare_char, exactly: characters, 4x4x128, block 64."""

from configs import base


def get_config():
  c = base.get_config()
  # nanoGPT's GPT: LayerNorm and Linear without bias, learned positions, exact GELU, tied.
  c.model = base.model_config(
    "tiny_gpt2",
    vocab_size=0,
    d_model=128,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    d_ff=512,
    max_seq_len=64,
    use_bias=False,
    dropout=0.0,
    mlp="gelu_exact",
  )  # torch nn.GELU() is exact
  c.data.corpus = "text"  # data.path, default ../shared/data/tinyshakespeare/input.txt
  c.data.tokenizer = "char"
  c.data.add_bos = False  # one continuous character stream, as nanoGPT's train.bin
  c.data.add_eos = False
  c.data.seq_len = 64
  c.data.window_stride = 1  # every offset is a row: nanoGPT samples random windows
  c.data.batch_size = 12
  c.data.eval_batch_size = 96
  c.opt.lr = 1e-3
  c.opt.final_lr = 1e-4
  c.opt.warmup_steps = 100
  c.opt.b1 = 0.9
  c.opt.b2 = 0.99
  c.opt.weight_decay = 0.1
  c.opt.decay_embeddings = True  # nanoGPT decays every 2-D parameter, embeddings included
  c.opt.clip_norm = 1.0
  c.train.steps = 2000
  c.train.log_every = 10
  c.train.eval_every = 250
  c.train.eval_batches = 0  # the whole validation split
  c.train.checkpoint_every = 500
  c.train.sample_prompt = "\n"
  c.train.sample_tokens = 300
  # Two CPU devices, data-parallel (6 rows each): XLA:CPU runs this small model's ops mostly
  # one at a time, so two devices keep both cores busy: about 43 -> 30 ms per step on a 2-core
  # machine when measured, 22 ms with the flat all-reduce and erf GELU since
  # (docs/benchmarks.md). CPU only; on GPUs and TPUs the mesh takes the accelerators.
  c.distributed.local_device_count = 2
  # One flat all-reduce of all gradients instead of XLA:CPU's one per parameter.
  c.mesh.grad_reduce = "flat"
  # YNNPACK for the matmuls only: XLA's own loops reduce these small softmax and norm rows
  # faster (28.3 -> 27.1 ms per step). The 10M shape is the other way round (7.8 -> 9.9 s).
  c.distributed.xla_flags = "--xla_cpu_experimental_ynn_fusion_type=dot"
  return c
