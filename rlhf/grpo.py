"""GRPO as a stage: G responses per prompt, advantages from each group's rewards (no critic),
and the clipped ratio loss with a KL penalty to the reference, through the one train step."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf import rollout
from rlhf.kl import kl_estimate
from rlhf.objectives import clipped_policy_loss, entropy, response_logprobs
from rlhf.online import OnlineConfig, OnlineStage, concatenated
from rlhf.score import jit_forward
from train import stage as stagelib

ADVANTAGES = ("group", "batch", "none", "rloo")
AGGREGATIONS = ("token_mean", "seq_mean", "fixed_sum")
KL_PENALTIES = ("loss", "reward")
LOSS_KL_ESTIMATORS = ("k3", "k2")
# The update batch, grouped: prompts [P, S] once, their G responses and per-token arrays
# [P, G, N] (rlhf/objectives.py grouped_response_logits).
PROMPT_KEYS = ("prompt_tokens", "prompt_mask")
BASE_KEYS = PROMPT_KEYS + ("response_tokens", "response_mask", "advantages")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(OnlineConfig):
  """config.rlhf for GRPO; configs/experiments/grpo_chat.py documents each field."""

  batch_size: int = 16  # prompts per iteration; batch_size * group_size episodes
  group_size: int = 8
  advantage: str = "group"
  std_eps: float = 1e-4
  beta: float = 0.04
  kl_penalty: str = "loss"
  kl_estimator: str = "k3"
  clip_low: float = 0.2
  clip_high: float = 0.2
  loss_agg: str = "token_mean"
  mask_truncated: bool = False
  mask_flat_groups: bool = False
  iterations: int = 1

  def __post_init__(self):
    super().__post_init__()
    if self.group_size < 2:
      raise ValueError(
        f"rlhf.group_size must be >= 2 (a group's baseline needs other samples), got "
        f"{self.group_size}"
      )
    for name, value, choices in (
      ("advantage", self.advantage, ADVANTAGES),
      ("loss_agg", self.loss_agg, AGGREGATIONS),
      ("kl_penalty", self.kl_penalty, KL_PENALTIES),
      ("kl_estimator", self.kl_estimator, LOSS_KL_ESTIMATORS),
    ):
      if value not in choices:
        raise ValueError(f"rlhf.{name}={value!r} is unknown; choose one of {choices}")
    if self.iterations <= 0:
      raise ValueError(f"rlhf.iterations must be > 0, got {self.iterations}")
    if not (0.0 <= self.clip_low < 1.0 and self.clip_high >= 0.0):
      raise ValueError(
        f"rlhf.clip_low must be in [0, 1) and rlhf.clip_high >= 0, got {self.clip_low} and "
        f"{self.clip_high}"
      )

  @property
  def passes(self) -> int:
    """Passes over each rollout batch."""
    return self.iterations

  @property
  def on_policy(self) -> bool:
    """Each rollout batch feeds exactly one update, taken at the weights that sampled it: the
    old logprobs are the update's own, detached, and need no forward pass of their own."""
    return self.iterations == 1 and self.minibatches == 1


# ---------------------------------------------------------------- pure functions


def group_advantages(rewards_B, group_size: int, how: str = "group", eps: float = 1e-4):
  """Per-episode advantages from rewards laid out as consecutive groups of `group_size`
  (one prompt's responses each):

  - group: (r - group mean) / (group std + eps), the GRPO paper's;
  - batch: (r - group mean) / (std of the whole batch + eps);
  - none:  r - group mean (Dr. GRPO: no division, so no per-prompt reweighting);
  - rloo:  r - mean of the group's other rewards = G / (G - 1) (r - group mean), an unbiased
    baseline.

  Standard deviations are the sample ones (n - 1), as TRL computes them. Also returns each
  episode's group having all-equal rewards (no signal) and the mean group std."""
  r = rewards_B.reshape(-1, group_size)
  mean = jnp.mean(r, axis=1, keepdims=True)
  std = jnp.std(r, axis=1, keepdims=True, ddof=1)
  centred = r - mean
  if how == "group":
    adv = centred / (std + eps)
  elif how == "batch":
    adv = centred / (jnp.std(rewards_B, ddof=1) + eps)
  elif how == "none":
    adv = centred
  elif how == "rloo":
    adv = centred * (group_size / (group_size - 1))
  else:
    raise ValueError(f"advantage {how!r} is unknown; choose one of {ADVANTAGES}")
  flat = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
  flat_B = jnp.broadcast_to(flat, r.shape).reshape(-1)
  return adv.reshape(-1), flat_B, jnp.mean(std)


def aggregate(loss_BxN, mask_BxN, how: str = "token_mean"):
  """(sum, count) of per-token losses (responses along the last axis), the loss being
  sum / count over the whole batch:

  - token_mean: every response token of the batch weighs the same (DAPO);
  - seq_mean: each sequence's token mean, then the mean over sequences (the GRPO paper's);
    a token of a long response weighs less than one of a short response;
  - fixed_sum: the sum over tokens over (rows x the most response tokens), a constant
    (Dr. GRPO)."""
  mask = mask_BxN.astype(jnp.float32)
  loss_BxN = loss_BxN * mask
  if how == "token_mean":
    return jnp.sum(loss_BxN), jnp.sum(mask)
  if how == "seq_mean":
    n_B = jnp.sum(mask, axis=-1)
    has_B = (n_B > 0).astype(jnp.float32)
    return jnp.sum(jnp.sum(loss_BxN, axis=-1) / jnp.maximum(n_B, 1.0)), jnp.sum(has_B)
  if how == "fixed_sum":
    return jnp.sum(loss_BxN), jnp.float32(mask.size)
  raise ValueError(f"loss aggregation {how!r} is unknown; choose one of {AGGREGATIONS}")


def grpo_token_loss(logp_BxN, old_BxN, ref_BxN, adv_BxN, mask_BxN, cfg):
  """Per-token GRPO loss: the clipped ratio loss (clip_low below, clip_high above) plus
  beta times the KL estimate to the reference when the KL is a loss term; and per-token
  metrics."""
  mask = mask_BxN.astype(jnp.float32)
  loss, m = clipped_policy_loss(
    logp_BxN,
    old_BxN,
    adv_BxN,
    mask,
    cfg.clip_low,
    cfg.clip_high,
    0.0,
    cfg.logratio_clamp,
  )
  ratio = m["ratio"]
  m["clip_low_fraction"] = ((ratio < 1.0 - cfg.clip_low) & (adv_BxN < 0)) * mask
  m["clip_high_fraction"] = ((ratio > 1.0 + cfg.clip_high) & (adv_BxN > 0)) * mask
  m["clip_fraction"] = m["clip_low_fraction"] + m["clip_high_fraction"]
  if cfg.beta > 0 and cfg.kl_penalty == "loss":
    kl = kl_estimate(logp_BxN, ref_BxN, cfg.kl_estimator) * mask
    loss = loss + cfg.beta * kl
    m["kl"] = kl
  return loss * mask, m


def grpo_loss_fn(cfg):
  """loss_fn(model, batch, rng) of the GRPO policy, aggregated as cfg.loss_agg; per-token
  metrics are means over the loss's response tokens."""

  def loss_fn(model, batch, rng):
    del rng  # dropout is off in RL
    mask = batch["response_mask"].astype(jnp.float32)
    logp, logits = response_logprobs(model, batch, cfg.temperature)
    old = jax.lax.stop_gradient(logp) if cfg.on_policy else batch["old_logprobs"]
    ref = batch.get("ref_logprobs")
    loss_BxN, token_m = grpo_token_loss(logp, old, ref, batch["advantages"], mask, cfg)
    total, count = aggregate(loss_BxN, mask, cfg.loss_agg)
    tokens = jnp.sum(mask)
    metrics = {k: (jnp.sum(v), tokens) for k, v in token_m.items()}
    metrics["entropy"] = (jnp.sum(entropy(logits, cfg.temperature) * mask), tokens)
    if cfg.on_policy:  # the update's logprobs are the trainer's recomputation of the sampler's
      gap = jnp.abs(jax.lax.stop_gradient(logp) - batch["sampler_logprobs"]) * mask
      metrics["logprob_gap"] = (jnp.sum(gap), tokens)
    return total, count, metrics

  return loss_fn


def episode_batch(
  adv_B,
  flat_B,
  eos_B,
  response_mask_BxN,
  *,
  mask_truncated: bool,
  mask_flat_groups: bool,
):
  """Per-token advantages and the loss mask: the response's tokens, less those of truncated
  responses (mask_truncated) and of groups with all-equal rewards (mask_flat_groups)."""
  keep_B = jnp.ones_like(adv_B)
  if mask_truncated:
    keep_B = keep_B * eos_B.astype(jnp.float32)
  if mask_flat_groups:
    keep_B = keep_B * (1.0 - flat_B.astype(jnp.float32))
  mask = response_mask_BxN.astype(jnp.float32) * keep_B[:, None]
  return {
    "advantages": adv_B[:, None] * jnp.ones_like(mask),
    "response_mask": mask.astype(response_mask_BxN.dtype),
  }


def _advantages(scores_B, eos_B, response_mask_BxN, old_BxN, ref_BxN, beta, cfg):
  """The episodes' advantages and loss mask, from their scores less beta times their summed
  k1 KL when the KL is a reward term (old and reference logprobs given)."""
  kl_B = jnp.zeros_like(scores_B)
  if old_BxN is not None and ref_BxN is not None:
    kl_B = jnp.sum((old_BxN - ref_BxN) * response_mask_BxN, axis=1)
  rewards_B = scores_B - beta * kl_B
  adv_B, flat_B, mean_std = group_advantages(rewards_B, cfg.group_size, cfg.advantage, cfg.std_eps)
  out = episode_batch(
    adv_B,
    flat_B,
    eos_B,
    response_mask_BxN,
    mask_truncated=cfg.mask_truncated,
    mask_flat_groups=cfg.mask_flat_groups,
  )
  g, n = cfg.group_size, response_mask_BxN.shape[1]
  out = {k: v.reshape(-1, g, n) for k, v in out.items()}  # grouped: [P, G, N]
  out["kl"] = jnp.mean(kl_B)
  out["flat_fraction"] = jnp.mean(flat_B.astype(jnp.float32))
  out["reward_std"] = mean_std
  return out


# ---------------------------------------------------------------- the stage


class GRPO(OnlineStage):
  """One state, 'policy'. The reference is loaded only when beta > 0; the old policy's
  logprobs are computed at scoring only when an update can be off-policy or the KL is a
  reward term. Updates and scoring read each prompt once per group (grouped batches); a
  minibatch is whole groups."""

  name = "grpo"

  def __init__(self, config, workdir: str):
    rl = stagelib.section(GRPOConfig, config.rlhf, "rlhf")
    super().__init__(
      config,
      workdir,
      GRPOConfig,
      updates_per_iteration=rl.iterations * rl.minibatches,
      reference=rl.beta > 0,
    )
    keys = BASE_KEYS + (("sampler_logprobs",) if rl.on_policy else ("old_logprobs",))
    if rl.beta > 0 and rl.kl_penalty == "loss":
      keys += ("ref_logprobs",)
    self.keys = {k: 2 if k in PROMPT_KEYS else 3 for k in keys}
    self.samples_per_prompt = rl.group_size
    self.states = {"policy": self.policy.state}
    self.state_shardings = {"policy": self.policy.shardings}
    self.steps = {
      "policy": stagelib.train_step(self.policy, self.mesh, self.keys, grpo_loss_fn(rl))
    }
    # The scoring pass: the old policy when updates can be off-policy or the KL is a reward
    # term, the reference when beta > 0, the reward model when there is one.
    self.score_policy = not rl.on_policy or (rl.beta > 0 and rl.kl_penalty == "reward")
    exact = self.model_cfg.vocab_size <= rl.exact_kl_vocab
    mesh = self.mesh
    self.forward = jit_forward(
      self.graphdefs, mesh.mesh, mesh.rules, rl.temperature, exact, self.ref_is_base
    )
    self.advantages = jax.jit(functools.partial(_advantages, cfg=rl))

  def models(self):
    return {"policy": ("lm", self.model_cfg)}

  def _chunks(self, batch: dict):
    """`batch` in minibatches of the update's size (whole groups): scoring runs the shapes
    the first update runs."""
    size = self.rows // self.rl.minibatches
    for k in range(self.rl.minibatches):
      yield self.take(batch, jnp.arange(k * size, (k + 1) * size))

  def _scoring_forward(self, grouped: dict, out: rollout.Rollout) -> dict:
    """The scoring pass in minibatches: logprobs from the grouped layout (each prompt run once
    per group), reward-model scores from the whole sequences."""
    fwd = {}
    policy = self.states["policy"].params if self.score_policy else None
    if policy is not None or self.ref_params is not None:
      fwd |= concatenated(
        self.forward(policy, self.ref_params, None, None, chunk) for chunk in self._chunks(grouped)
      )
    if self.reward_params is not None:
      flat = self.mesh.shard(out.device_batch())
      size = self.rows * self.rl.group_size // self.rl.minibatches
      fwd |= concatenated(
        self.forward(
          None,
          None,
          None,
          self.reward_params,
          self.take(flat, jnp.arange(k * size, (k + 1) * size)),
        )
        for k in range(self.rl.minibatches)
      )
    return fwd

  def score(self, prompts, out: rollout.Rollout) -> tuple[dict, dict]:
    rl = self.rl
    g, n = rl.group_size, out.response_mask_BxN.shape[1]
    grouped = self.mesh.shard(
      {
        "prompt_tokens": prompts["prompt_tokens"],
        "prompt_mask": prompts["prompt_mask"],
        "response_tokens": out.response_tokens_BxN.reshape(-1, g, n),
        "response_mask": out.response_mask_BxN.reshape(-1, g, n),
      }
    )
    fwd = self._scoring_forward(grouped, out)
    records = [self.records[int(i)] for i in prompts["_index"] for _ in range(g)]
    raw, scores = self.scores(records, out, fwd.get("rm_scores"))
    flat = lambda key: None if key not in fwd else fwd[key].reshape(-1, n)
    beta = rl.beta if rl.kl_penalty == "reward" else 0.0
    dev = self.mesh.shard(
      {
        "scores": scores,
        "eos": out.eos_B.astype(np.float32),
        "response_mask": out.response_mask_BxN,
      }
    )
    adv = self.advantages(
      dev["scores"],
      dev["eos"],
      dev["response_mask"],
      flat("old_logprobs"),
      flat("ref_logprobs"),
      jnp.float32(beta),
    )
    full = {**grouped, "advantages": adv["advantages"], "response_mask": adv["response_mask"]}
    for key in ("old_logprobs", "ref_logprobs"):
      if key in fwd:
        full[key] = fwd[key]
    if rl.on_policy:
      full["sampler_logprobs"] = self.mesh.shard({"s": out.sampler_logprobs_BxN.reshape(-1, g, n)})[
        "s"
      ]
    full = {k: full[k] for k in self.keys}
    mask = out.response_mask_BxN > 0
    lengths = out.response_mask_BxN.sum(axis=1)
    figures = {
      "score": float(np.mean(scores)),
      "score_raw": float(np.mean(raw)),
      "reward_std": float(adv["reward_std"]),
      "frac_reward_zero_std": float(adv["flat_fraction"]),
      **self.rollout_figures(out),
      "response_length_min": float(lengths.min()),
      "response_length_max": float(lengths.max()),
      "truncated_fraction": float(1.0 - np.mean(out.eos_B)),
    }
    if "old_logprobs" in fwd:
      old = np.asarray(jax.device_get(fwd["old_logprobs"])).reshape(-1, n)
      gap = np.abs(out.sampler_logprobs_BxN - old)[mask]
      figures["logprob_gap_max"] = float(gap.max()) if gap.size else 0.0
    if "ref_logprobs" in fwd and "old_logprobs" in fwd:  # mean summed k1 per episode
      figures["kl"] = float(adv["kl"])
    if "exact_kl" in fwd:
      exact = np.asarray(jax.device_get(fwd["exact_kl"])).reshape(-1, n)
      figures["kl_exact"] = float(np.mean((exact * mask).sum(axis=1)))
    return full, figures

  def minibatch_updates(self, mb):
    yield "policy", mb


def build(config, workdir: str) -> GRPO:
  return GRPO(config, workdir)
