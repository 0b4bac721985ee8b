"""The policy and value losses of PPO (and GRPO's clipped ratio), as sums and counts over
response tokens, and the forward passes they read logprobs and values from."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.logprobs import token_logprobs


def response_logits(model, batch):
  """Logits predicting each response token: the forward over the whole sequence but its last
  token, read at the positions one before each response token. The sequence is left-padded
  (segment ids from its mask), so padding never reaches a real token."""
  n = batch["response_mask"].shape[1]
  tokens_BxL = batch["tokens"]
  logits = model(tokens_BxL[:, :-1], batch["positions"][:, :-1], batch["mask"][:, :-1])
  return logits[:, -n:]


def response_logprobs(model, batch, temperature: float):
  """log pi(response token | everything before it) at `temperature`."""
  n = batch["response_mask"].shape[1]
  logits_BxNxV = response_logits(model, batch)
  return token_logprobs(logits_BxNxV, batch["tokens"][:, -n:], temperature), logits_BxNxV


def response_values(model, batch):
  """The critic's value for each response token, read from the hidden state one position
  before it (the state the token is chosen from)."""
  n = batch["response_mask"].shape[1]
  args = (batch["tokens"][:, :-1], batch["positions"][:, :-1], batch["mask"][:, :-1])
  if getattr(model, "value_head", None) is not None:  # a policy that is its own critic
    return model.logits_and_values(*args)[1][:, -n:]
  return model(*args)[:, -n:]


def entropy(logits_BxNxV, temperature: float):
  """Entropy of the tempered next-token distribution at each position."""
  logits_BxNxV = logits_BxNxV.astype(jnp.float32)
  if temperature not in (0.0, 1.0):
    logits_BxNxV = logits_BxNxV / temperature
  logp = jax.nn.log_softmax(logits_BxNxV, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def clipped_policy_loss(
  logp_BxN,
  old_logp_BxN,
  advantages_BxN,
  mask_BxN,
  clip_low: float = 0.2,
  clip_high: float = 0.2,
  dual_clip: float = 0.0,
  logratio_clamp: float = 20.0,
):
  """Per-token PPO loss max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = pi / pi_old,
  with the log-ratio clamped (one stale token cannot overflow exp) and, when dual_clip > 1,
  capped at -A * dual_clip for negative advantages (Ye et al. 2020). Returns the per-token
  losses, zero off the mask, and the per-token metrics (ratio, clipped, approx KL)."""
  mask = mask_BxN.astype(jnp.float32)
  logratio = jnp.clip(logp_BxN - old_logp_BxN, -logratio_clamp, logratio_clamp)
  ratio = jnp.exp(logratio)
  unclipped = -advantages_BxN * ratio
  clipped = -advantages_BxN * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  loss = jnp.maximum(unclipped, clipped)
  if dual_clip > 1.0:
    loss = jnp.where(advantages_BxN < 0, jnp.minimum(loss, -advantages_BxN * dual_clip), loss)
  token_metrics = {
    "ratio": ratio * mask,
    "clip_fraction": (clipped > unclipped).astype(jnp.float32) * mask,
    # Schulman's k3 of the old policy against the new: a non-negative estimate.
    "approx_kl": (jnp.expm1(logratio) - logratio) * mask,
  }
  return loss * mask, token_metrics


def clipped_value_loss(values_BxN, old_values_BxN, returns_BxN, mask_BxN, clip: float = 0.2):
  """Per-token 0.5 max((V - R)^2, (clip(V, V_old +- clip) - R)^2), zero off the mask, and
  where the clipped term was the larger."""
  mask = mask_BxN.astype(jnp.float32)
  clipped_v = old_values_BxN + jnp.clip(values_BxN - old_values_BxN, -clip, clip)
  a, b = jnp.square(values_BxN - returns_BxN), jnp.square(clipped_v - returns_BxN)
  return 0.5 * jnp.maximum(a, b) * mask, (b > a).astype(jnp.float32) * mask


def _policy_terms(logp, logits, batch, mask, cfg):
  """Per-token clipped policy losses and the summed policy metrics (entropy included)."""
  loss, token_m = clipped_policy_loss(
    logp,
    batch["old_logprobs"],
    batch["advantages"],
    mask,
    cfg.clip,
    cfg.clip,
    cfg.dual_clip,
    cfg.logratio_clamp,
  )
  metrics = {k: jnp.sum(v) for k, v in token_m.items()}
  metrics["entropy"] = jnp.sum(entropy(logits, cfg.temperature) * mask)
  return loss, metrics


def ppo_policy_loss_fn(cfg):
  """loss_fn(model, batch, rng) of the policy: the clipped ratio loss summed over response
  tokens, with the count of response tokens (the token mean over the minibatch)."""

  def loss_fn(model, batch, rng):
    del rng  # dropout is off in RL
    mask = batch["response_mask"].astype(jnp.float32)
    logp, logits = response_logprobs(model, batch, cfg.temperature)
    loss, metrics = _policy_terms(logp, logits, batch, mask, cfg)
    return jnp.sum(loss), jnp.sum(mask), metrics

  return loss_fn


def ppo_value_loss_fn(cfg):
  """loss_fn(model, batch, rng) of a separate critic: vf_coef times the clipped value loss."""

  def loss_fn(model, batch, rng):
    del rng
    mask = batch["response_mask"].astype(jnp.float32)
    values = response_values(model, batch)
    loss, clipped = clipped_value_loss(
      values, batch["old_values"], batch["returns"], mask, cfg.value_clip
    )
    metrics = {"value_loss": jnp.sum(loss), "value_clip_fraction": jnp.sum(clipped)}
    return cfg.vf_coef * jnp.sum(loss), jnp.sum(mask), metrics

  return loss_fn


def ppo_shared_loss_fn(cfg):
  """loss_fn(model, batch, rng) of a policy that is its own critic (one trunk, an LM head and a
  value head): the clipped policy loss plus vf_coef times the clipped value loss, from one
  forward pass."""

  def loss_fn(model, batch, rng):
    del rng
    n = batch["response_mask"].shape[1]
    mask = batch["response_mask"].astype(jnp.float32)
    args = (batch["tokens"][:, :-1], batch["positions"][:, :-1], batch["mask"][:, :-1])
    logits, values = model.logits_and_values(*args)
    logits, values = logits[:, -n:], values[:, -n:]
    logp = token_logprobs(logits, batch["tokens"][:, -n:], cfg.temperature)
    pg, metrics = _policy_terms(logp, logits, batch, mask, cfg)
    vf, clipped = clipped_value_loss(
      values, batch["old_values"], batch["returns"], mask, cfg.value_clip
    )
    metrics["policy_loss"] = jnp.sum(pg)
    metrics["value_loss"] = jnp.sum(vf)
    metrics["value_clip_fraction"] = jnp.sum(clipped)
    return jnp.sum(pg) + cfg.vf_coef * jnp.sum(vf), jnp.sum(mask), metrics

  return loss_fn
