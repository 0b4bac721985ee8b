"""PPO as a stage: roll out, score once, then K epochs of minibatch updates of the policy and
its critic, each through the one train step."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from model import lora
from rlhf import rollout
from rlhf.kl import CONTROLLERS, ESTIMATORS, KLController
from rlhf.objectives import ppo_policy_loss_fn, ppo_shared_loss_fn, ppo_value_loss_fn
from rlhf.online import NO_DROPOUT, OnlineConfig, OnlineStage, concatenated, final_scores  # noqa: F401
from rlhf.score import advantages, jit_forward
from train import stage as stagelib
from train import weights

POLICY_KEYS = ("tokens", "positions", "mask", "response_mask", "old_logprobs", "advantages")
CRITIC_KEYS = ("tokens", "positions", "mask", "response_mask", "old_values", "returns")
SHARED_KEYS = POLICY_KEYS + ("old_values", "returns")
CRITICS = ("separate", "shared")


@dataclasses.dataclass(frozen=True)
class PPOConfig(OnlineConfig):
  """config.rlhf for PPO; configs/experiments/ppo_*.py documents each field."""

  kl_estimator: str = "k1"
  kl_controller: str = "fixed"
  kl_target: float = 6.0
  kl_horizon: int = 10000
  whiten_rewards: bool = False
  gamma: float = 1.0
  lam: float = 0.95
  epochs: int = 4
  minibatches: int = 4
  clip: float = 0.2
  dual_clip: float = 0.0
  value_clip: float = 0.2
  vf_coef: float = 0.1
  critic: str = "separate"
  critic_from: str = ""
  critic_lr: float = 0.0

  @property
  def passes(self) -> int:
    """Passes over each rollout batch."""
    return self.epochs

  def __post_init__(self):
    super().__post_init__()
    if self.kl_estimator not in ESTIMATORS:
      raise ValueError(f"rlhf.kl_estimator={self.kl_estimator!r}; choose one of {ESTIMATORS}")
    if self.kl_controller not in CONTROLLERS:
      raise ValueError(f"rlhf.kl_controller={self.kl_controller!r}; choose one of {CONTROLLERS}")
    if self.critic not in CRITICS:
      raise ValueError(f"rlhf.critic={self.critic!r}; choose one of {CRITICS}")
    if self.epochs <= 0:
      raise ValueError(f"rlhf.epochs must be > 0, got {self.epochs}")
    if self.critic_lr < 0 or (self.critic_lr and self.critic == "shared"):
      raise ValueError(
        f"rlhf.critic_lr={self.critic_lr}: a separate critic's learning rate (> 0), or 0 for "
        f"the policy's (opt.lr); a shared critic trains with the policy's"
      )


class PPO(OnlineStage):
  """States 'policy' and 'critic' (each with its optimizer); frozen reference and reward
  models are read only when a rollout is scored."""

  name = "ppo"

  def __init__(self, config, workdir: str):
    rl = stagelib.section(PPOConfig, config.rlhf, "rlhf")
    self.shared = rl.critic == "shared"
    super().__init__(
      config,
      workdir,
      PPOConfig,
      updates_per_iteration=rl.epochs * rl.minibatches,
      policy_kind="lm_value" if self.shared else "lm",
    )
    mesh, tc, graphdefs = self.mesh, self.train_cfg, self.graphdefs
    if self.shared:  # the policy's value head is the critic
      self.critic = None
      graphdefs["critic"] = self.policy.graphdef
      self.states = {"policy": self.policy.state}
      self.state_shardings = {"policy": self.policy.shardings}
      self.steps = {
        "policy": stagelib.train_step(self.policy, mesh, SHARED_KEYS, ppo_shared_loss_fn(rl))
      }
    else:
      critic_source = (
        weights.resolve(rl.critic_from, field="rlhf.critic_from")
        if rl.critic_from
        else (self.rm_source or self.source)
      )
      self.weights_from = {
        "critic": "rlhf.critic_from"
        if rl.critic_from
        else ("rlhf.reward" if self.rm_source else "train.init_from")
      }
      critic_cfg = (
        self.model_cfg
        if critic_source is None
        # The run's LoRA setting, not its source's: a critic from a plain model trains
        # adapters when the policy does, and one from a LoRA run trains in full when not.
        else dataclasses.replace(
          critic_source.model_cfg, **NO_DROPOUT, **lora.settings(self.model_cfg), num_classes=0
        )
      )
      critic_opt = self.opt_cfg
      if rl.critic_lr:  # the whole schedule scaled, so final_lr / lr is kept
        scale = rl.critic_lr / critic_opt.lr
        critic_opt = dataclasses.replace(
          critic_opt, lr=rl.critic_lr, final_lr=critic_opt.final_lr * scale
        )
      self.critic = stagelib.build_model(
        "scalar", critic_cfg, critic_opt, mesh, tc.seed + 1, critic_source, head_init="zero"
      )
      if critic_source is self.rm_source:
        # The reward model's head, on the scale the rewards are on: the critic's first values
        # are normalised scores, not raw ones many reward stds away from the returns.
        self.critic.state = normalise_head(self.critic.state, self.norm)
      graphdefs["critic"] = self.critic.graphdef
      self.states = {"policy": self.policy.state, "critic": self.critic.state}
      self.state_shardings = {"policy": self.policy.shardings, "critic": self.critic.shardings}
      self.steps = {
        "policy": stagelib.train_step(self.policy, mesh, POLICY_KEYS, ppo_policy_loss_fn(rl)),
        "critic": stagelib.train_step(self.critic, mesh, CRITIC_KEYS, ppo_value_loss_fn(rl)),
      }
    exact = self.model_cfg.vocab_size <= rl.exact_kl_vocab
    self.forward = jit_forward(
      graphdefs, mesh.mesh, mesh.rules, rl.temperature, exact, self.ref_is_base
    )
    self.advantages = jax.jit(
      functools.partial(
        advantages,
        kl_estimator=rl.kl_estimator,
        whiten_rewards=rl.whiten_rewards,
        gamma=rl.gamma,
        lam=rl.lam,
      )
    )
    self.kl = KLController(rl.beta, rl.kl_controller, rl.kl_target, rl.kl_horizon)

  def models(self):
    if self.shared:
      return {"policy": ("lm_value", self.model_cfg)}
    return {"policy": ("lm", self.model_cfg), "critic": ("scalar", self.critic.cfg)}

  def score(self, prompts, out: rollout.Rollout) -> tuple[dict, dict]:
    """The rollout batch the updates read, on the mesh, and the iteration's figures."""
    rl = self.rl
    batch = self.mesh.shard(out.device_batch())
    critic = self.states["policy" if self.shared else "critic"].params
    # Scored in minibatches of the update's size: memory stays that of one minibatch, and the
    # first update of an iteration recomputes its logprobs with the same shapes.
    size = rl.batch_size // rl.minibatches
    parts = []
    for k in range(rl.minibatches):
      chunk = self.take(batch, jnp.arange(k * size, (k + 1) * size))
      policy = self.states["policy"].params
      parts.append(self.forward(policy, self.ref_params, critic, self.reward_params, chunk))
    fwd = concatenated(parts)
    records = [self.records[int(i)] for i in prompts["_index"]]
    raw, scores = self.scores(records, out, fwd.get("rm_scores"))
    beta = self.kl.beta
    adv = self.advantages(
      fwd["old_logprobs"],
      fwd["ref_logprobs"],
      fwd["values"],
      jnp.asarray(scores, jnp.float32),
      batch["response_mask"],
      jnp.float32(beta),
    )
    full = {
      **batch,
      "old_logprobs": fwd["old_logprobs"],
      "advantages": adv["advantages"],
      "old_values": fwd["values"],
      "returns": adv["returns"],
    }
    host = jax.device_get({k: v for k, v in {**fwd, **adv}.items() if k != "rm_scores"})
    mask = out.response_mask_BxN > 0
    gap = np.abs(out.sampler_logprobs_BxN - host["old_logprobs"])[mask]
    figures = {
      "score": float(np.mean(scores)),
      "score_raw": float(np.mean(raw)),
      "kl": float(np.mean(host["kl_B"])),
      "beta": beta,
      "returns_mean": float(host["returns_mean"]),
      "returns_var": float(host["returns_var"]),
      "explained_variance": float(host["explained_variance"]),
      **self.rollout_figures(out),
      "logprob_gap_max": float(gap.max()) if gap.size else 0.0,
    }
    if "exact_kl" in host:
      figures["kl_exact"] = float(np.mean((host["exact_kl"] * mask).sum(axis=1)))
    return full, figures

  def minibatch_updates(self, mb):
    if self.shared:
      yield "policy", {key: mb[key] for key in SHARED_KEYS}
    else:
      yield "policy", {key: mb[key] for key in POLICY_KEYS}
      yield "critic", {key: mb[key] for key in CRITIC_KEYS}

  def after_iteration(self, figures):
    self.kl.update(figures["kl"], self.rl.batch_size)

  def host_state(self) -> dict:
    return {**super().host_state(), "beta": self.kl.beta}

  def load_host_state(self, state: dict) -> None:
    super().load_host_state(state)
    self.kl.beta = float(state.get("beta", self.kl.beta))


def build(config, workdir: str) -> PPO:
  return PPO(config, workdir)


def normalise_head(state, norm: dict):
  """`state` with its scalar head's kernel and bias mapped so the head outputs
  norm["gain"] * value + norm["bias"] (rlhf.reward.normalized), shardings kept."""
  head = state.params["head"]
  gain, bias = norm["gain"], norm["bias"]
  new = {"kernel": head["kernel"] * gain, "bias": head["bias"] * gain + bias}
  new = jax.tree.map(lambda x, old: jax.device_put(x.astype(old.dtype), old.sharding), new, head)
  return dataclasses.replace(state, params={**state.params, "head": new})
