"""Rotary position embedding and its context-extension variants (linear, Llama 3, YaRN), with
the frequencies computed as Hugging Face computes them, so imported models match."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")


def frequencies(cfg) -> tuple[np.ndarray, float]:
  """(inv_freq [head_dim / 2] float32, attention factor): the angle per position of each
  rotated pair, and what cos and sin are multiplied by (YaRN's; 1 otherwise)."""
  k, theta = cfg.head_size, cfg.rope_theta
  exponents = np.arange(0, k, 2, dtype=np.int64).astype(np.float32) / np.float32(k)
  pos_freqs = np.power(np.float32(theta), exponents, dtype=np.float32)
  inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
  factor, kind = cfg.rope_factor, cfg.rope_scaling
  if kind == "none":
    return inv_freq, 1.0
  if kind == "linear":
    return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
  original = cfg.rope_original_max_len
  if kind == "llama3":
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = (2 * np.float32(math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
  # YaRN (Peng et al. 2023): interpolate the slow pairs, keep the fast ones, ramp between.
  attention = cfg.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

  def correction(rotations):
    return (k * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

  lo = max(math.floor(correction(cfg.rope_beta_fast)), 0)
  hi = min(math.ceil(correction(cfg.rope_beta_slow)), k - 1)
  hi = hi + 0.001 if lo == hi else hi
  ramp = np.clip((np.arange(k // 2, dtype=np.float32) - lo) / np.float32(hi - lo), 0, 1)
  extrapolation = (1 - ramp).astype(np.float32)
  interpolation = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
  inv = interpolation * (1 - extrapolation) + inv_freq * extrapolation
  return inv.astype(np.float32), float(attention)


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, inv_freq, factor: float = 1.0):
  """Rotary embedding in the half-split layout (the Hugging Face LLaMA convention), cos and
  sin scaled by `factor` (YaRN's attention factor)."""
  half = x_BxLxHxK.shape[-1] // 2
  angles_BxLxK2 = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(
    np.asarray(inv_freq, np.float32)
  )
  sin = jnp.sin(angles_BxLxK2)[:, :, None, :]
  cos = jnp.cos(angles_BxLxK2)[:, :, None, :]
  if factor != 1.0:
    sin, cos = sin * factor, cos * factor
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)
