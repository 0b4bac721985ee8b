"""The one log-probability of a token under a tempered softmax: sampler, losses and RL share it."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BxLxV: jax.Array, targets_BxL: jax.Array, temperature: float = 1.0):
  """log softmax(logits / temperature)[target] in float32, for any leading shape.

  Every logprob in the project comes from here (the sampler's, the LM loss's, scoring and the
  RL losses), so that the behaviour, reference and updated policies can never disagree on how
  the temperature or the normaliser is applied. A temperature of 0 (greedy sampling) is
  scored as 1: greedy picks do not change the distribution they are scored under."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  if temperature not in (0.0, 1.0):
    logits_BxLxV = logits_BxLxV / temperature
  logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return target_BxL - logz_BxL
