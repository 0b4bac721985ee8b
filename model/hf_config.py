"""Hugging Face config.json to and from our ModelConfig: which architectures map, and each
unsupported setting named."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from model.hf_files import ConversionError

# HF architecture -> our family name; the family decides the tensor layout (model/convert.py).
ARCHITECTURES = {
  "GPT2LMHeadModel": "gpt2",
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "mistral",
  "Qwen2ForCausalLM": "qwen2",
  "Qwen3ForCausalLM": "qwen3",
  "GemmaForCausalLM": "gemma",
}
_MODEL_TYPES = {family: arch for arch, family in ARCHITECTURES.items()}
# What each LLaMA-like family adds to LLaMA, as our config fields.
_FAMILY_FIELDS = {
  "llama": {},
  "mistral": {},
  "qwen2": {"qkv_bias": True},
  "qwen3": {"qk_norm": True},
  "gemma": {"mlp": "geglu", "norm_offset": 1.0, "scale_embeddings": True},
}


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
  family = ARCHITECTURES[arch]
  fields = _gpt2_fields(arch, c) if family == "gpt2" else _llama_like_fields(arch, family, c)
  return ModelConfig(**{**fields, "dropout": 0.0, "attention_dropout": 0.0, **overrides})


def _gpt2_fields(arch: str, c: dict) -> dict:
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
  return dict(
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


def _llama_like_fields(arch: str, family: str, c: dict) -> dict:
  act = c.get("hidden_activation") or c.get("hidden_act", "silu")
  want = ("gelu_pytorch_tanh", "gelu") if family == "gemma" else ("silu",)
  if act not in want:
    raise _unsupported(arch, "hidden_act", act, f"{arch}'s MLP is implemented with {want[0]}")
  attn_bias, mlp_bias = c.get("attention_bias", False), c.get("mlp_bias", False)
  if family == "llama" and attn_bias != mlp_bias:
    raise _unsupported(
      arch,
      "attention_bias",
      attn_bias,
      f"our use_bias covers attention and MLP together (mlp_bias={mlp_bias})",
    )
  if family != "llama" and attn_bias:
    raise _unsupported(arch, "attention_bias", attn_bias, f"{arch} is implemented without it")
  d, h = _field(c, "hidden_size"), _field(c, "num_attention_heads")
  head_dim = c.get("head_dim") or d // h
  fields = dict(
    vocab_size=_field(c, "vocab_size"),
    d_model=d,
    n_layers=_field(c, "num_hidden_layers"),
    n_heads=h,
    n_kv_heads=_field(c, "num_key_value_heads", h),
    head_dim=0 if d % h == 0 and head_dim == d // h else head_dim,
    d_ff=_field(c, "intermediate_size"),
    max_seq_len=_field(c, "max_position_embeddings"),
    norm="rmsnorm",
    norm_eps=_field(c, "rms_norm_eps", 1e-6),
    position="rope",
    mlp="swiglu",
    use_bias=bool(attn_bias),
    tie_embeddings=bool(_field(c, "tie_word_embeddings", family == "gemma")),
    sliding_window=_sliding_window(arch, family, c),
    **_rope_fields(arch, c),
  )
  return {**fields, **_FAMILY_FIELDS[family]}


def _sliding_window(arch: str, family: str, c: dict) -> int:
  """Mistral's window on every layer; Qwen's on the layers layer_types marks (all or none)."""
  if family == "mistral":
    return int(c.get("sliding_window") or 0)
  if family not in ("qwen2", "qwen3") or not c.get("use_sliding_window"):
    return 0
  n = _field(c, "num_hidden_layers")
  types = c.get("layer_types") or [
    "sliding_attention" if i >= c.get("max_window_layers", 0) else "full_attention"
    for i in range(n)
  ]
  if set(types) == {"full_attention"} or not c.get("sliding_window"):
    return 0
  if set(types) != {"sliding_attention"}:
    raise _unsupported(
      arch,
      "layer_types",
      types,
      "a sliding window on some layers and not others is not implemented (all or none)",
    )
  return int(c["sliding_window"])


def _rope_fields(arch: str, c: dict) -> dict:
  """RoPE's base and scaling from rope_parameters (transformers 5) or rope_scaling and
  rope_theta (earlier releases)."""
  kind_of = lambda r: r.get("rope_type", r.get("type", "default"))  # noqa: E731
  rope, scaling = dict(c.get("rope_parameters") or {}), dict(c.get("rope_scaling") or {})
  if kind_of(rope) == "default" and scaling:  # older releases: rope_scaling beside rope_theta
    rope = {**rope, **scaling}
  kind = kind_of(rope)
  fields = {"rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))}
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise _unsupported(
      arch, "partial_rotary_factor", rope["partial_rotary_factor"], "RoPE on every dim only"
    )
  if kind == "default":
    return fields
  if kind not in ("linear", "llama3", "yarn"):
    raise _unsupported(arch, "rope_type", kind, "RoPE scaling default, linear, llama3 or yarn")
  fields.update(rope_scaling=kind, rope_factor=float(_field(rope, "factor")))
  if kind == "llama3":
    fields.update(
      rope_original_max_len=int(_field(rope, "original_max_position_embeddings")),
      rope_low_freq_factor=float(_field(rope, "low_freq_factor")),
      rope_high_freq_factor=float(_field(rope, "high_freq_factor")),
    )
  elif kind == "yarn":
    for name in ("mscale", "mscale_all_dim"):
      if rope.get(name):
        raise _unsupported(arch, name, rope[name], "YaRN without DeepSeek's mscale")
    if rope.get("truncate", True) is not True:
      raise _unsupported(arch, "truncate", rope["truncate"], "YaRN with truncated ranges only")
    fields.update(
      rope_original_max_len=int(
        rope.get("original_max_position_embeddings") or _field(c, "max_position_embeddings")
      ),
      rope_beta_fast=float(rope.get("beta_fast") or 32.0),
      rope_beta_slow=float(rope.get("beta_slow") or 1.0),
      rope_attention_factor=float(rope.get("attention_factor") or 0.0),
    )
  return fields


def family_of(cfg: ModelConfig) -> str:
  """The HF architecture family that computes exactly what `cfg` computes."""
  if (cfg.norm, cfg.position, cfg.mlp, cfg.use_bias) == ("layernorm", "learned", "gelu", True):
    if cfg.n_kv_heads != cfg.n_heads:
      raise ConversionError(
        f"GPT2LMHeadModel has no grouped-query attention: n_kv_heads="
        f"{cfg.n_kv_heads} must equal n_heads={cfg.n_heads}"
      )
    return "gpt2"
  if (cfg.norm, cfg.position) != ("rmsnorm", "rope") or cfg.mlp not in ("swiglu", "geglu"):
    raise ConversionError(
      f"no Hugging Face architecture matches norm={cfg.norm!r}, position={cfg.position!r}, "
      f"mlp={cfg.mlp!r}, use_bias={cfg.use_bias}; supported: GPT2LMHeadModel (layernorm, "
      f"learned, gelu, use_bias=True) and the LLaMA-like ones (rmsnorm, rope, swiglu or geglu)"
    )
  extras = {
    "qkv_bias": cfg.qkv_bias,
    "qk_norm": cfg.qk_norm,
    "mlp": cfg.mlp if cfg.mlp != "swiglu" else None,
    "norm_offset": cfg.norm_offset or None,
    "scale_embeddings": cfg.scale_embeddings,
    "sliding_window": cfg.sliding_window,
    "use_bias": cfg.use_bias,
  }
  extras = {k: v for k, v in extras.items() if v}
  for family, fields in (
    ("gemma", {"mlp": "geglu", "norm_offset": 1.0, "scale_embeddings": True}),
    ("qwen3", {"qk_norm": True}),
    ("qwen2", {"qkv_bias": True}),
    ("mistral", {"sliding_window": cfg.sliding_window}),
    ("llama", {}),
    ("llama", {"use_bias": True}),
  ):
    if extras == fields or (family in ("qwen2", "qwen3") and _qwen_window(extras, fields)):
      if family == "gemma" and not cfg.tie_embeddings:
        raise ConversionError("GemmaForCausalLM ties its embeddings: set tie_embeddings=True")
      return family
  raise ConversionError(
    f"no Hugging Face architecture has this combination of features: {extras}; supported: "
    "LLaMA (optionally use_bias), Mistral (sliding_window), Qwen2 (qkv_bias, optionally "
    "sliding_window), Qwen3 (qk_norm, optionally sliding_window), Gemma (geglu, norm_offset 1, "
    "scale_embeddings)"
  )


def _qwen_window(extras: dict, fields: dict) -> bool:
  return {k: v for k, v in extras.items() if k != "sliding_window"} == fields


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
  rope = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling}
  rope["rope_theta"] = cfg.rope_theta
  if cfg.rope_scaling != "none":
    rope["factor"] = cfg.rope_factor
  if cfg.rope_scaling in ("llama3", "yarn"):
    rope["original_max_position_embeddings"] = cfg.rope_original_max_len
  if cfg.rope_scaling == "llama3":
    rope.update(
      low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor
    )
  if cfg.rope_scaling == "yarn":
    rope.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
    if cfg.rope_attention_factor:
      rope["attention_factor"] = cfg.rope_attention_factor
  out = {
    **common,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.d_ff,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_kv_heads,
    "head_dim": cfg.head_size,
    "hidden_act": "gelu_pytorch_tanh" if family == "gemma" else "silu",
    "max_position_embeddings": cfg.max_seq_len,
    "rms_norm_eps": cfg.norm_eps,
    # rope_theta and rope_scaling at the top level too, for transformers releases before 5.
    "rope_parameters": rope,
    "rope_theta": cfg.rope_theta,
    "attention_dropout": cfg.attention_dropout,
  }
  if cfg.rope_scaling != "none":
    out["rope_scaling"] = rope
  if family == "llama":
    out.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
  elif family in ("qwen3", "gemma"):
    out["attention_bias"] = False
  if family == "mistral":
    out["sliding_window"] = cfg.sliding_window or None
  if family in ("qwen2", "qwen3"):
    window = cfg.sliding_window
    out.update(
      use_sliding_window=bool(window),
      sliding_window=window or None,
      max_window_layers=0 if window else cfg.n_layers,
      layer_types=[("sliding_attention" if window else "full_attention")] * cfg.n_layers,
    )
  return out
