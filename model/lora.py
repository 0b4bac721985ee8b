"""LoRA adapters (model/layers.py Dense, ModelConfig.lora_*): which parameters train, and
folding adapters into their kernels for export.

Parameters are pure nested dicts (nnx.to_pure_dict); a parameter's path is its tuple of keys,
e.g. ('blocks', 0, 'attn', 'q', 'lora_a')."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from model.config import ModelConfig

ADAPTERS = ("lora_a", "lora_b")
HEADS = ("head", "value_head")  # fresh scalar heads train in full beside the adapters


def settings(cfg: ModelConfig) -> dict:
  """The LoRA fields of a config (rank, alpha, dropout, targets)."""
  return {k: getattr(cfg, k) for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}


def is_adapter(path: tuple) -> bool:
  return bool(path) and path[-1] in ADAPTERS


def trains(path: tuple) -> bool:
  """Whether a LoRA run trains the parameter at `path`: the adapters, and a scalar model's
  head (a reward model or critic needs its head trained; PEFT's modules_to_save)."""
  return is_adapter(path) or (bool(path) and path[0] in HEADS)


def split(params: dict, keep, prefix: tuple = ()) -> tuple[dict, dict]:
  """(the parameters whose path `keep` accepts, the rest), both nested like `params`, without
  empty branches."""
  picked, rest = {}, {}
  for key, value in params.items():
    path = prefix + (key,)
    if isinstance(value, dict):
      a, b = split(value, keep, path)
      if a:
        picked[key] = a
      if b:
        rest[key] = b
    else:
      (picked if keep(path) else rest)[key] = value
  return picked, rest


def join(a: dict, b: dict) -> dict:
  """The union of two nested dicts with no leaf in common (what `split` separated)."""
  out = dict(a)
  for key, value in b.items():
    if key in out and isinstance(value, dict):
      out[key] = join(out[key], value)
    elif key in out:
      raise ValueError(f"join: {key!r} is in both trees")
    else:
      out[key] = value
  return out


def merge(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """The parameters with every adapter folded into its kernel, kernel + (alpha/r) A @ B, and
  the adapters removed; and the config without LoRA. The result is a plain model's."""
  scale = cfg.lora_alpha / max(cfg.lora_rank, 1)

  def fold(tree: dict) -> dict:
    out = {k: fold(v) if isinstance(v, dict) else v for k, v in tree.items()}
    if "lora_a" in out:
      a, b = out.pop("lora_a"), out.pop("lora_b")
      out["kernel"] = _folded(out["kernel"], a, b, scale)
    return out

  return fold(params), cfg.replace(lora_rank=0)


def _folded(kernel, a, b, scale):
  """kernel [*lead, *in, *out] + scale * a [*lead, *in, r] @ b [*lead, r, *out]; `lead` is
  the stacked layers' axis when the blocks are scanned."""
  n_out = kernel.ndim - a.ndim + 1
  n_lead = b.ndim - 1 - n_out
  lead = kernel.shape[:n_lead]
  a_NxIxR = a.reshape((math.prod(lead), -1, a.shape[-1])).astype(jnp.float32)
  b_NxRxO = b.reshape((math.prod(lead), b.shape[n_lead], -1)).astype(jnp.float32)
  delta = jnp.einsum("nir,nro->nio", a_NxIxR, b_NxRxO, precision=jax.lax.Precision.HIGHEST)
  merged = kernel.astype(jnp.float32) + scale * delta.reshape(kernel.shape)
  return merged.astype(kernel.dtype)


def count(params: dict) -> tuple[int, int]:
  """(adapter parameters, all parameters)."""
  adapters, _ = split(params, is_adapter)
  size = lambda t: sum(int(math.prod(x.shape)) for x in jax.tree.leaves(t))
  return size(adapters), size(params)
