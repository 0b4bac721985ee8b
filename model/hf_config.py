"""Hugging Face config.json to and from our ModelConfig: which architectures map, and each
unsupported setting named."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from model.hf_files import ConversionError

# HF architecture -> our family name; the family decides the tensor layout below.
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
_MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def _field(c: dict, name: str, default: Any = None):
  if c.get(name) is not None:
    return c[name]
  if default is None:
    raise ConversionError(f"config.json lacks the required field {name!r}")
  return default


def _unsupported(arch: str, field: str, value, why: str) -> ConversionError:
  return ConversionError(f"{arch} config.json has {field}={value!r}, which is not supported: {why}")


def architecture(hf_config: dict) -> str:
  archs = hf_config.get("architectures") or [
    _MODEL_TYPES.get(hf_config.get("model_type"), hf_config.get("model_type"))
  ]
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ConversionError(
      f"unsupported architecture {archs} (model_type="
      f"{hf_config.get('model_type')!r}); supported: "
      f"{', '.join(ARCHITECTURES)}"
    )
  return archs[0]


def hf_config_to_model(hf_config: dict, **overrides) -> ModelConfig:
  """Maps an HF config.json dict to a ModelConfig; `overrides` set fields HF does not have
  (scan_layers, remat, dtype, param_dtype, ...). Dropout is a training choice: 0 unless set."""
  arch, c = architecture(hf_config), hf_config
  if ARCHITECTURES[arch] == "gpt2":
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise _unsupported(
        arch,
        "activation_function",
        act,
        "our GELU MLP is the tanh approximation (gelu_new, gelu_pytorch_tanh)",
      )
    for name, ok in (
      ("scale_attn_weights", True),
      ("scale_attn_by_inverse_layer_idx", False),
      ("add_cross_attention", False),
    ):
      if c.get(name, ok) != ok:
        raise _unsupported(arch, name, c[name], f"only {name}={ok} is implemented")
    d = _field(c, "n_embd")
    fields = dict(
      vocab_size=_field(c, "vocab_size"),
      d_model=d,
      n_layers=_field(c, "n_layer"),
      n_heads=_field(c, "n_head"),
      n_kv_heads=_field(c, "n_head"),
      d_ff=_field(c, "n_inner", 4 * d),
      max_seq_len=_field(c, "n_positions"),
      norm="layernorm",
      norm_eps=_field(c, "layer_norm_epsilon", 1e-5),
      position="learned",
      mlp="gelu",
      use_bias=True,
      tie_embeddings=_field(c, "tie_word_embeddings", True),
    )
  else:
    act = c.get("hidden_act", "silu")
    if act != "silu":
      raise _unsupported(arch, "hidden_act", act, "our SwiGLU MLP uses silu")
    attn_bias, mlp_bias = c.get("attention_bias", False), c.get("mlp_bias", False)
    if attn_bias != mlp_bias:
      raise _unsupported(
        arch,
        "attention_bias",
        attn_bias,
        f"our use_bias covers attention and MLP together (mlp_bias={mlp_bias})",
      )
    rope = c.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
      raise _unsupported(arch, "rope_parameters", rope, "only plain RoPE (rope_type='default')")
    scaling = c.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
      raise _unsupported(arch, "rope_scaling", scaling, "only plain RoPE (no scaling)")
    d, h = _field(c, "hidden_size"), _field(c, "num_attention_heads")
    if c.get("head_dim") not in (None, d // h):
      raise _unsupported(
        arch,
        "head_dim",
        c["head_dim"],
        f"head_dim must be hidden_size / num_attention_heads = {d // h}",
      )
    fields = dict(
      vocab_size=_field(c, "vocab_size"),
      d_model=d,
      n_layers=_field(c, "num_hidden_layers"),
      n_heads=h,
      n_kv_heads=_field(c, "num_key_value_heads", h),
      d_ff=_field(c, "intermediate_size"),
      max_seq_len=_field(c, "max_position_embeddings"),
      norm="rmsnorm",
      norm_eps=_field(c, "rms_norm_eps", 1e-6),
      position="rope",
      rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
      mlp="swiglu",
      use_bias=bool(attn_bias),
      tie_embeddings=_field(c, "tie_word_embeddings", False),
    )
  return ModelConfig(**{**fields, "dropout": 0.0, "attention_dropout": 0.0, **overrides})


def family_of(cfg: ModelConfig) -> str:
  """The HF architecture family that computes exactly what `cfg` computes."""
  if (cfg.norm, cfg.position, cfg.mlp, cfg.use_bias) == ("layernorm", "learned", "gelu", True):
    if cfg.n_kv_heads != cfg.n_heads:
      raise ConversionError(
        f"GPT2LMHeadModel has no grouped-query attention: n_kv_heads="
        f"{cfg.n_kv_heads} must equal n_heads={cfg.n_heads}"
      )
    return "gpt2"
  if (cfg.norm, cfg.position, cfg.mlp) == ("rmsnorm", "rope", "swiglu"):
    return "llama"
  raise ConversionError(
    f"no Hugging Face architecture matches norm={cfg.norm!r}, position={cfg.position!r}, "
    f"mlp={cfg.mlp!r}, use_bias={cfg.use_bias}; supported: GPT2LMHeadModel (layernorm, "
    f"learned, gelu, use_bias=True) and LlamaForCausalLM (rmsnorm, rope, swiglu)"
  )


def model_to_hf_config(cfg: ModelConfig) -> dict:
  """The HF config.json dict of the architecture equivalent to `cfg`."""
  family = family_of(cfg)
  common = {
    "architectures": [_MODEL_TYPES[family]],
    "model_type": family,
    "vocab_size": cfg.vocab_size,
    "tie_word_embeddings": cfg.tie_embeddings,
    "dtype": cfg.param_dtype,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
  }
  if family == "gpt2":
    return {
      **common,
      "n_embd": cfg.d_model,
      "n_layer": cfg.n_layers,
      "n_head": cfg.n_heads,
      "n_inner": cfg.d_ff,
      "n_positions": cfg.max_seq_len,
      "activation_function": "gelu_new",
      "layer_norm_epsilon": cfg.norm_eps,
      "resid_pdrop": cfg.dropout,
      "embd_pdrop": cfg.dropout,
      "attn_pdrop": cfg.attention_dropout,
    }
  # rope_theta is written at the top level too, for transformers releases before 5.
  return {
    **common,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.d_ff,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.max_seq_len,
    "rms_norm_eps": cfg.norm_eps,
    "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    "rope_theta": cfg.rope_theta,
    "attention_bias": cfg.use_bias,
    "mlp_bias": cfg.use_bias,
    "attention_dropout": cfg.attention_dropout,
  }
