"""Losses as (sum, count, metric sums): exact under gradient accumulation and across devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.logprobs import token_logprobs

__all__ = ["cross_entropy", "lm_loss", "token_logprobs"]


def cross_entropy(logits_BxLxV, targets_BxL, weights_BxL, z_loss: float = 0.0):
  """Token cross entropy summed over weighted positions, with optional z-loss (PaLM)."""
  weights_BxL = weights_BxL.astype(jnp.float32)
  # Masked positions (padding) may hold inf or NaN logits; zero them before anything reads
  # them, so neither the loss nor its gradient can pick them up.
  logits_BxLxV = jnp.where(weights_BxL[..., None] > 0, logits_BxLxV.astype(jnp.float32), 0.0)
  nll_BxL = -token_logprobs(logits_BxLxV, targets_BxL)
  loss_BxL = nll_BxL
  if z_loss:
    loss_BxL = loss_BxL + z_loss * jnp.square(jax.nn.logsumexp(logits_BxLxV, axis=-1))
  correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)

  def weighted_sum(x_BxL):
    return jnp.sum(x_BxL * weights_BxL)

  metrics = {"nll": weighted_sum(nll_BxL), "accuracy": weighted_sum(correct_BxL)}
  return weighted_sum(loss_BxL), jnp.sum(weights_BxL), metrics


def lm_loss(model, batch, rng=None, *, z_loss: float = 0.0):
  """Next-token loss of a language model on a packed batch (pretraining and SFT)."""
  logits_BxLxV = model(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_rng=rng)
  return cross_entropy(logits_BxLxV, batch["targets"], batch["loss_mask"], z_loss)
