"""Scoring a rollout once, before any update: old and reference logprobs, values and the
reward model's score, then per-token rewards and advantages. Frozen models appear only here."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes, layers
from model.logprobs import token_logprobs
from rlhf.gae import gae, masked_mean, masked_var, whiten
from rlhf.kl import kl_estimate
from rlhf.objectives import response_logits, response_targets, response_values
from rlhf.reward import score as reward_score


def forward(
  policy,
  ref,
  critic,
  reward,
  batch,
  *,
  graphdefs,
  temperature: float,
  exact_kl: bool,
  mesh,
  rules,
  ref_adapters_off: bool = False,
):
  """The rollout's forward passes, each for a model that is not None: the policy's (old) and
  the reference's logprobs of each response token, the critic's values, the reward model's
  score, and with both policy and reference the exact KL per token. `ref_adapters_off`: the
  reference is the LoRA policy's own parameters with its adapters off (its base weights)."""
  with axes.axis_rules(mesh, rules):
    targets = response_targets(batch)
    out = {}
    if policy is not None:
      policy_logits = response_logits(nnx.merge(graphdefs["policy"], policy), batch)
      out["old_logprobs"] = token_logprobs(policy_logits, targets, temperature)
    if ref is not None:
      with layers.adapters_off() if ref_adapters_off else contextlib.nullcontext():
        ref_logits = response_logits(nnx.merge(graphdefs["ref"], ref), batch)
      out["ref_logprobs"] = token_logprobs(ref_logits, targets, temperature)
    if critic is not None:
      out["values"] = response_values(nnx.merge(graphdefs["critic"], critic), batch)
    if reward is not None:  # at each sequence's last real token: its EOS when it stopped
      out["rm_scores"] = reward_score(
        graphdefs["reward"], reward, batch["tokens"], batch["mask"], batch["positions"]
      )
    if exact_kl and policy is not None and ref is not None:
      # sum over the vocabulary of pi (log pi - log ref), at the same temperature
      logp = jax.nn.log_softmax(policy_logits / temperature, axis=-1)
      logq = jax.nn.log_softmax(ref_logits / temperature, axis=-1)
      out["exact_kl"] = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
  return out


def jit_forward(graphdefs, mesh, rules, temperature: float, exact_kl: bool, ref_adapters_off=False):
  return jax.jit(
    functools.partial(
      forward,
      graphdefs=graphdefs,
      temperature=temperature,
      exact_kl=exact_kl,
      mesh=mesh,
      rules=rules,
      ref_adapters_off=ref_adapters_off,
    )
  )


def advantages(
  old_logprobs_BxN,
  ref_logprobs_BxN,
  values_BxN,
  scores_B,
  mask_BxN,
  beta,
  *,
  kl_estimator: str,
  whiten_rewards: bool,
  gamma: float,
  lam: float,
):
  """Per-token rewards -beta * KL estimate, plus the sequence's score on its last response
  token (the EOS when it stopped); optionally whitened without shifting their mean. Then GAE
  and advantages whitened over the response tokens. Returns a dict of [B, N] arrays and the
  per-sequence summed KL."""
  mask = mask_BxN.astype(jnp.float32)
  kl_BxN = kl_estimate(old_logprobs_BxN, ref_logprobs_BxN, kl_estimator) * mask
  n = mask.shape[1]
  last_B = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
  at_last_BxN = (jnp.arange(n)[None, :] == last_B[:, None]).astype(jnp.float32)
  rewards_BxN = -beta * kl_BxN + scores_B[:, None] * at_last_BxN
  if whiten_rewards:
    rewards_BxN = whiten(rewards_BxN, mask, shift_mean=False)
  adv_BxN, returns_BxN = gae(rewards_BxN, values_BxN, mask, gamma, lam)
  explained = 1.0 - masked_var(returns_BxN - values_BxN, mask) / jnp.maximum(
    masked_var(returns_BxN, mask), 1e-8
  )
  return {
    "advantages": whiten(adv_BxN, mask),
    "returns": returns_BxN,
    "rewards": rewards_BxN,
    "kl_B": jnp.sum(kl_BxN, axis=1),
    "returns_mean": masked_mean(returns_BxN, mask),
    "returns_var": masked_var(returns_BxN, mask),
    "explained_variance": explained,
  }
