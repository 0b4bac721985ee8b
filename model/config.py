"""Model configuration: a frozen dataclass, its validation, and presets."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "gelu_exact", "swiglu", "geglu")
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
REMATS = ("none", "full", "dots")
ATTENTION_IMPLS = ("xla", "cudnn", "jax")
DROPOUT_PRNGS = ("threefry", "rbg", "hash")
DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections by name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the decoder. Every field is validated on construction."""

  vocab_size: int = 256  # tokens in the vocabulary
  d_model: int = 64  # width of the residual stream
  n_layers: int = 2  # decoder blocks
  n_heads: int = 4  # query heads
  n_kv_heads: int = 4  # key/value heads: n_heads for MHA, fewer for GQA, 1 for MQA
  d_ff: int = 256  # hidden width of the MLP
  max_seq_len: int = 128  # longest sequence (size of a learned position table)
  norm: str = "rmsnorm"  # layernorm | rmsnorm
  norm_eps: float = 1e-5  # epsilon inside the norms
  position: str = "rope"  # learned | rope
  rope_theta: float = 10000.0  # RoPE base frequency
  # RoPE for longer contexts than trained on: none | linear (positions / rope_factor) |
  # llama3 (Llama 3.1+: low frequencies / rope_factor, a smooth band between) | yarn
  rope_scaling: str = "none"
  rope_factor: float = 1.0  # how much longer the context is than the original one
  rope_original_max_len: int = 0  # the context length the model was trained on (llama3, yarn)
  rope_low_freq_factor: float = 1.0  # llama3: wavelengths > original / this are scaled
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths < original / this are kept
  rope_beta_fast: float = 32.0  # yarn: rotations over the original context kept as trained
  rope_beta_slow: float = 1.0  # yarn: rotations below which pairs are fully interpolated
  rope_attention_factor: float = 0.0  # yarn: cos and sin scale; 0 is 0.1 ln(rope_factor) + 1
  mlp: str = "swiglu"  # gelu (tanh approximation, GPT-2) | gelu_exact (erf) | swiglu | geglu
  # (GELU-gated, tanh approximation: Gemma)
  use_bias: bool = False  # biases in dense layers and layernorm (GPT-2 has them)
  qkv_bias: bool = False  # biases on the query, key and value projections alone (Qwen2)
  qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
  head_dim: int = 0  # width of each attention head; 0 is d_model / n_heads (read head_size)
  norm_offset: float = 0.0  # norms multiply by norm_offset + scale; Gemma's are (1 + w)
  scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (Gemma)
  sliding_window: int = 0  # each query sees the last sliding_window tokens alone; 0: all
  tie_embeddings: bool = False  # LM head reuses the token embedding
  dropout: float = 0.0  # residual and embedding dropout rate while training
  attention_dropout: float = 0.0  # dropout on attention probabilities while training (nanoGPT's
  # attn_dropout, GPT-2's attn_pdrop); runs the einsum attention path, not a fused kernel
  dropout_prng: str = "threefry"  # threefry: the same masks on every backend and sharding;
  # rbg: XLA's RngBitGenerator, about 4x cheaper masks on CPU, generated whole on each device;
  # hash: a keyed hash of each element's index, computed inside the fusion that applies it
  # (no mask in memory), the same on every sharding
  dtype: str = "float32"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of parameters
  scan_layers: bool = False  # stack blocks and run them with lax.scan (fast compile)
  remat: str = "none"  # none | full | dots: what each block saves for backward
  attention_impl: str = "xla"  # xla: our einsum path | cudnn: jax.nn.dot_product_attention's
  # fused kernel (GPU) | jax: jax.nn.dot_product_attention's XLA path
  init_std: float = 0.02  # std of the normal initialiser
  attention_query_blocks: int = 1  # einsum path without a KV cache: split queries into this
  # many blocks that skip the keys after them (the causal mask's zeros); 4 saves ~3/8 of the
  # work. Lengths it does not divide run unblocked (the trainer requires it to divide seq_len)
  kv_bucket: int = 64  # with a KV cache, attend over the shortest prefix of the cache that
  # holds every visible key, rounded up to kv_bucket x 1, 1.5, 2, 3, 4, 6, ... slots (one
  # compiled branch per length); 0 attends over every slot
  lora_rank: int = 0  # LoRA: rank r of the adapters on lora_targets; 0 builds none
  lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
  lora_dropout: float = 0.0  # dropout on the adapters' input while training
  lora_targets: tuple = ("q", "k", "v", "o")  # of q, k, v, o (attention), gate, up, down (MLP)
  num_classes: int = 0  # a scalar-head model's outputs: 0 for one value (reward model,
  # critic), k >= 2 for a k-way classifier

  def __post_init__(self):
    positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim < 0:
      raise ValueError(f"ModelConfig.head_dim must be an int >= 0, got {self.head_dim!r}")
    if not self.head_dim and self.d_model % self.n_heads:
      raise ValueError(
        f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), "
        f"or set head_dim"
      )
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
        f"ModelConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
      )
    choices = {
      "norm": NORMS,
      "position": POSITIONS,
      "mlp": MLPS,
      "rope_scaling": ROPE_SCALINGS,
      "remat": REMATS,
      "attention_impl": ATTENTION_IMPLS,
      "dropout_prng": DROPOUT_PRNGS,
      "dtype": DTYPES,
      "param_dtype": DTYPES,
    }
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(
          f"ModelConfig.{name}={getattr(self, name)!r} is unknown; "
          f"choose one of {', '.join(allowed)}"
        )
    if self.position == "rope" and self.head_size % 2:
      raise ValueError(f"ModelConfig.position='rope' needs an even head size, got {self.head_size}")
    self._check_rope_scaling()
    if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
      raise ValueError(
        f"ModelConfig.sliding_window must be an int >= 0, got {self.sliding_window!r}"
      )
    for name in ("dropout", "attention_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")
    if self.attention_dropout and self.attention_impl == "cudnn":
      raise ValueError(
        "ModelConfig.attention_dropout > 0 needs attention_impl 'xla' or "
        "'jax': the cuDNN path of jax.nn.dot_product_attention has no "
        "dropout"
      )
    if self.norm_eps <= 0:
      raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps}")
    if self.rope_theta <= 0:
      raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
    if not isinstance(self.attention_query_blocks, int) or self.attention_query_blocks < 1:
      raise ValueError(
        f"ModelConfig.attention_query_blocks must be an int >= 1, got "
        f"{self.attention_query_blocks!r}"
      )
    if (
      not isinstance(self.kv_bucket, int) or isinstance(self.kv_bucket, bool) or self.kv_bucket < 0
    ):
      raise ValueError(f"ModelConfig.kv_bucket must be an int >= 0, got {self.kv_bucket!r}")
    if self.init_std <= 0:
      raise ValueError(f"ModelConfig.init_std must be > 0, got {self.init_std}")
    self._check_lora()
    k = self.num_classes
    if not isinstance(k, int) or isinstance(k, bool) or k < 0 or k == 1:
      raise ValueError(f"ModelConfig.num_classes must be 0 or an int >= 2, got {k!r}")

  def _check_rope_scaling(self):
    kind = self.rope_scaling
    if kind == "none":
      return
    if self.position != "rope":
      raise ValueError(f"ModelConfig.rope_scaling={kind!r} needs position='rope'")
    if self.rope_factor < 1.0:
      raise ValueError(
        f"ModelConfig.rope_factor must be >= 1 with rope_scaling, got {self.rope_factor}"
      )
    if kind in ("llama3", "yarn") and self.rope_original_max_len <= 0:
      raise ValueError(f"ModelConfig.rope_scaling={kind!r} needs rope_original_max_len > 0")
    if kind == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
      raise ValueError(
        f"ModelConfig.rope_scaling='llama3' needs 0 < rope_low_freq_factor < "
        f"rope_high_freq_factor, got {self.rope_low_freq_factor}, {self.rope_high_freq_factor}"
      )
    if kind == "yarn" and not 0 < self.rope_beta_slow < self.rope_beta_fast:
      raise ValueError(
        f"ModelConfig.rope_scaling='yarn' needs 0 < rope_beta_slow < rope_beta_fast, got "
        f"{self.rope_beta_slow}, {self.rope_beta_fast}"
      )

  def _check_lora(self):
    r = self.lora_rank
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
      raise ValueError(f"ModelConfig.lora_rank must be an int >= 0, got {r!r}")
    if isinstance(self.lora_targets, str):
      object.__setattr__(self, "lora_targets", tuple(self.lora_targets.split(",")))
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
    if unknown:
      raise ValueError(
        f"ModelConfig.lora_targets has {unknown}: choose among {', '.join(LORA_TARGETS)}"
      )
    if r and not self.lora_targets:
      raise ValueError("ModelConfig.lora_rank > 0 needs at least one of lora_targets")
    if r and "gate" in self.lora_targets and self.mlp not in ("swiglu", "geglu"):
      raise ValueError(f"ModelConfig.lora_targets has 'gate', but mlp={self.mlp!r} has none")
    if self.lora_alpha <= 0:
      raise ValueError(f"ModelConfig.lora_alpha must be > 0, got {self.lora_alpha}")
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(f"ModelConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")

  def lora_on(self, target: str) -> bool:
    """Whether the projection named `target` carries a LoRA adapter."""
    return self.lora_rank > 0 and target in self.lora_targets

  @property
  def head_size(self) -> int:
    """Width of each attention head: head_dim, or d_model / n_heads when it is 0."""
    return self.head_dim or self.d_model // self.n_heads

  @property
  def gated(self) -> bool:
    """Whether the MLP has a gate projection (SwiGLU, GeGLU)."""
    return self.mlp in ("swiglu", "geglu")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)


PRESETS = {
  # Tiny LLaMA-style model for unit tests: GQA, RoPE, SwiGLU, RMSNorm.
  "tiny": ModelConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64
  ),
  # Tiny GPT-2-style model for unit tests.
  "tiny_gpt2": ModelConfig(
    vocab_size=256,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=4,
    d_ff=256,
    max_seq_len=64,
    norm="layernorm",
    position="learned",
    mlp="gelu",
    use_bias=True,
    tie_embeddings=True,
  ),
  # GPT-2 small (124M).
  "gpt2_124m": ModelConfig(
    vocab_size=50257,
    d_model=768,
    n_layers=12,
    n_heads=12,
    n_kv_heads=12,
    d_ff=3072,
    max_seq_len=1024,
    norm="layernorm",
    position="learned",
    mlp="gelu",
    use_bias=True,
    tie_embeddings=True,
  ),
  # LLaMA-style ~1.1B (the TinyLlama shape): GQA 32/4, untied.
  "llama_1b": ModelConfig(
    vocab_size=32000,
    d_model=2048,
    n_layers=22,
    n_heads=32,
    n_kv_heads=4,
    d_ff=5632,
    max_seq_len=2048,
    norm_eps=1e-5,
  ),
  # LLaMA-2 7B shape.
  "llama_7b": ModelConfig(
    vocab_size=32000,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=32,
    d_ff=11008,
    max_seq_len=4096,
    norm_eps=1e-5,
  ),
  # Open checkpoints' shapes (their config.json), for the planner and for init_from runs.
  # Llama-3.2-1B: 1,235,814,400 parameters, tied, llama3 RoPE scaling.
  "llama3_2_1b": ModelConfig(
    vocab_size=128256,
    d_model=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    d_ff=8192,
    max_seq_len=131072,
    norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling="llama3",
    rope_factor=32.0,
    rope_original_max_len=8192,
    tie_embeddings=True,
  ),
  # Qwen2.5-0.5B: 494,032,768 parameters, tied, bias on q/k/v.
  "qwen2_5_0_5b": ModelConfig(
    vocab_size=151936,
    d_model=896,
    n_layers=24,
    n_heads=14,
    n_kv_heads=2,
    d_ff=4864,
    max_seq_len=32768,
    norm_eps=1e-6,
    rope_theta=1000000.0,
    qkv_bias=True,
    tie_embeddings=True,
  ),
  # Qwen3-0.6B: 596,049,920 parameters, tied, q/k norms, head_dim 128 (16 x 128 > 1024).
  "qwen3_0_6b": ModelConfig(
    vocab_size=151936,
    d_model=1024,
    n_layers=28,
    n_heads=16,
    n_kv_heads=8,
    head_dim=128,
    d_ff=3072,
    max_seq_len=40960,
    norm_eps=1e-6,
    rope_theta=1000000.0,
    qk_norm=True,
    tie_embeddings=True,
  ),
}


def preset(name: str, **overrides) -> ModelConfig:
  """Returns the named preset, optionally with fields replaced."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
  return PRESETS[name].replace(**overrides)
