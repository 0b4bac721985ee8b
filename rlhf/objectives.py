"""The policy and value losses of PPO (and GRPO's clipped ratio), as sums and counts over
response tokens, and the forward passes they read logprobs and values from."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.logprobs import token_logprobs


def response_logits(model, batch):
  """Logits predicting each response token. A flat batch (tokens, positions, mask: prompt and
  response in one left-padded row) runs the forward over the whole sequence but its last token
  and reads the positions one before each response token; padding is its own segment, so it
  never reaches a real token. A grouped batch (prompt_tokens: one row per prompt) goes to
  grouped_response_logits."""
  if "prompt_tokens" in batch:
    return grouped_response_logits(model, batch)
  n = batch["response_mask"].shape[1]
  tokens_BxL = batch["tokens"]
  logits = model(tokens_BxL[:, :-1], batch["positions"][:, :-1], batch["mask"][:, :-1])
  return logits[:, -n:]


def response_targets(batch):
  """The response tokens the logits predict: [B, N] flat, [P, G, N] grouped."""
  if "prompt_tokens" in batch:
    return batch["response_tokens"]
  return batch["tokens"][:, -batch["response_mask"].shape[-1] :]


def grouped_response_logits(model, batch):
  """[P, G, N, V] logits of G responses to each of P prompts, the prompt run once per group.

  The prompt (prompt_tokens, prompt_mask: [P, S], left-padded) fills a KV cache; its G copies
  then serve the responses (response_tokens, response_mask: [P, G, N]), which run against it
  as one [P G, N - 1] chunk. The first response token is predicted from the prompt's last
  state, the others from the chunk's. The same attention as the flat forward (same segments,
  positions and causality) on (S + G (N - 1)) / (G (S + N - 1)) of its tokens; the gradient of the
  shared prompt sums over its group, as the repeat's transpose."""
  prompt_PxS, pmask_PxS = batch["prompt_tokens"], batch["prompt_mask"].astype(jnp.int32)
  resp_PxGxN, rmask_PxGxN = batch["response_tokens"], batch["response_mask"]
  p, s = prompt_PxS.shape
  _, g, n = resp_PxGxN.shape
  positions_PxS = jnp.maximum(jnp.cumsum(pmask_PxS, axis=1) - 1, 0)
  cache = model.init_cache(p, s + n - 1)
  h_PxSxD, cache = model.hidden(prompt_PxS, positions_PxS, pmask_PxS, cache=cache)
  h_BxNxD = jnp.repeat(h_PxSxD[:, -1:], g, axis=0)  # B = P G rows, group-major
  if n > 1:
    shared = cache._replace(
      k_NxBxGxTxK=jnp.repeat(cache.k_NxBxGxTxK, g, axis=1),
      v_NxBxGxTxK=jnp.repeat(cache.v_NxBxGxTxK, g, axis=1),
      segment_ids_BxT=jnp.repeat(cache.segment_ids_BxT, g, axis=0),
    )
    prompt_len_B = jnp.repeat(jnp.sum(pmask_PxS, axis=1), g)
    tokens_BxM = resp_PxGxN.reshape(p * g, n)[:, :-1]
    positions_BxM = prompt_len_B[:, None] + jnp.arange(n - 1, dtype=jnp.int32)[None]
    segments_BxM = rmask_PxGxN.reshape(p * g, n)[:, :-1].astype(jnp.int32)
    h_rest, _ = model.hidden(tokens_BxM, positions_BxM, segments_BxM, cache=shared)
    h_BxNxD = jnp.concatenate([h_BxNxD, h_rest], axis=1)
  return model.logits(h_BxNxD).reshape(p, g, n, -1)


def response_logprobs(model, batch, temperature: float):
  """log pi(response token | everything before it) at `temperature`, flat or grouped."""
  logits_BxNxV = response_logits(model, batch)
  return token_logprobs(logits_BxNxV, response_targets(batch), temperature), logits_BxNxV


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
