"""Generalised advantage estimation and whitening over the valid tokens of a batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x, mask):
  mask = mask.astype(x.dtype)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_var(x, mask):
  """Variance over the valid entries (the biased estimate; whitening needs no correction)."""
  mean = masked_mean(x, mask)
  return masked_mean(jnp.square(x - mean), mask)


def whiten(x_BxN, mask_BxN, shift_mean: bool = True, eps: float = 1e-8):
  """x scaled to unit variance over the valid tokens (and centred when shift_mean); invalid
  tokens come out 0. Rewards are whitened without the shift, which would change which
  responses are better than no response at all."""
  mean = masked_mean(x_BxN, mask_BxN)
  out = (x_BxN - mean) * jax.lax.rsqrt(masked_var(x_BxN, mask_BxN) + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask_BxN > 0, out, 0.0)


def gae(rewards_BxN, values_BxN, mask_BxN, gamma: float = 1.0, lam: float = 0.95):
  """(advantages, returns) of each response token: delta_t = r_t + gamma V_{t+1} - V_t and
  A_t = delta_t + gamma lam A_{t+1}, with V = 0 (and nothing to add) after a response ends.
  Returns = A + V, the critic's regression target. `mask` is 1 on response tokens (left
  aligned: a response's tokens come first, then padding)."""
  mask_BxN = mask_BxN.astype(jnp.float32)
  values_BxN = values_BxN * mask_BxN
  rewards_BxN = rewards_BxN * mask_BxN
  next_values_BxN = jnp.concatenate([values_BxN[:, 1:], jnp.zeros_like(values_BxN[:, :1])], 1)
  deltas_BxN = rewards_BxN + gamma * next_values_BxN - values_BxN

  def back(carry_B, xs):
    delta_B, m_B = xs
    adv_B = (delta_B + gamma * lam * carry_B) * m_B
    return adv_B, adv_B

  _, adv_NxB = jax.lax.scan(
    back, jnp.zeros_like(deltas_BxN[:, 0]), (deltas_BxN.T, mask_BxN.T), reverse=True
  )
  advantages_BxN = adv_NxB.T
  return advantages_BxN, (advantages_BxN + values_BxN) * mask_BxN
