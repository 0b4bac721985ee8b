"""PPO as a stage: roll out, score once, then K epochs of minibatch updates of the policy and
its critic, each through the one train step."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from data import chat, sources
from data.tokenizer import tokenizer_to_json
from model.sampling import Sampler, SamplingConfig
from rlhf import rewards, rollout
from rlhf.kl import CONTROLLERS, ESTIMATORS, KLController
from rlhf.objectives import ppo_policy_loss_fn, ppo_shared_loss_fn, ppo_value_loss_fn
from rlhf.score import advantages, jit_forward
from train import stage as stagelib
from train import weights
from train.pretrain import lm_model_config

POLICY_KEYS = ("tokens", "positions", "mask", "response_mask", "old_logprobs", "advantages")
CRITIC_KEYS = ("tokens", "positions", "mask", "response_mask", "old_values", "returns")
SHARED_KEYS = POLICY_KEYS + ("old_values", "returns")
CRITICS = ("separate", "shared")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """config.rlhf for PPO; configs/experiments/ppo_*.py documents each field."""

  prompts: str = ""
  prompt_field: str = "prompt"
  max_prompt_len: int = 64
  prompt_overflow: str = "truncate"
  batch_size: int = 64
  response_len: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  reward: str = ""
  missing_eos_penalty: float = 0.0
  kl_estimator: str = "k1"
  kl_controller: str = "fixed"
  beta: float = 0.05
  kl_target: float = 6.0
  kl_horizon: int = 10000
  whiten_rewards: bool = False
  gamma: float = 1.0
  lam: float = 0.95
  epochs: int = 4
  minibatches: int = 4
  clip: float = 0.2
  dual_clip: float = 0.0
  logratio_clamp: float = 20.0
  value_clip: float = 0.2
  vf_coef: float = 0.1
  critic: str = "separate"
  critic_from: str = ""
  exact_kl_vocab: int = 4096
  tokenizer: str = "char"
  vocab_size: int = 2048
  seed: int = 0

  def __post_init__(self):
    if not self.prompts:
      raise ValueError(
        "rlhf.prompts is empty: give the prompt JSONL (files, a directory or a glob)"
      )
    if not self.reward:
      raise ValueError(
        "rlhf.reward is empty: give a reward model's workdir or a function as module:function"
      )
    if self.kl_estimator not in ESTIMATORS:
      raise ValueError(f"rlhf.kl_estimator={self.kl_estimator!r}; choose one of {ESTIMATORS}")
    if self.kl_controller not in CONTROLLERS:
      raise ValueError(f"rlhf.kl_controller={self.kl_controller!r}; choose one of {CONTROLLERS}")
    if self.critic not in CRITICS:
      raise ValueError(f"rlhf.critic={self.critic!r}; choose one of {CRITICS}")
    if self.temperature <= 0:
      raise ValueError(
        f"rlhf.temperature must be > 0 (it divides the logits of every logprob), got "
        f"{self.temperature}"
      )
    for name in ("batch_size", "response_len", "max_prompt_len", "epochs", "minibatches"):
      if getattr(self, name) <= 0:
        raise ValueError(f"rlhf.{name} must be > 0, got {getattr(self, name)}")
    if self.batch_size % self.minibatches:
      raise ValueError(
        f"rlhf.batch_size={self.batch_size} must split into rlhf.minibatches={self.minibatches}"
      )


def final_scores(raw_B, norm: dict, eos_B, missing_eos_penalty: float) -> np.ndarray:
  """Scores as rewards see them: the reward model's normalised (gain * raw + bias), less the
  penalty for each response that never emitted EOS."""
  scores = norm["gain"] * np.asarray(raw_B, np.float64) + norm["bias"]
  return (scores - missing_eos_penalty * (~np.asarray(eos_B, bool))).astype(np.float32)


def _take(batch, idx):
  return jax.tree.map(lambda x: x[idx], batch)


class PPO(stagelib.Stage):
  """States 'policy' and 'critic' (each with its optimizer); frozen reference and reward
  models are read only when a rollout is scored."""

  name = "ppo"

  def __init__(self, config, workdir: str):
    self.train_cfg = tc = stagelib.section(stagelib.TrainConfig, config.train, "train")
    self.rl = rl = stagelib.section(PPOConfig, config.rlhf, "rlhf")
    source = stagelib.init_source(tc)
    self.records = [
      {**r, "_index": i}
      for i, r in enumerate(sources.read_prompts(rl.prompts, field=rl.prompt_field))
    ]
    texts = [r[rl.prompt_field] for r in self.records if isinstance(r[rl.prompt_field], str)]
    self.tokenizer = tok = stagelib.stage_tokenizer(
      rl.tokenizer, rl.vocab_size, source, texts, workdir
    )
    seq_len = rl.max_prompt_len + rl.response_len
    no_dropout = {"dropout": 0.0, "attention_dropout": 0.0}  # RL updates need exact logprobs
    self.model_cfg = dataclasses.replace(
      lm_model_config(config, tok, source, seq_len), **no_dropout
    )
    self.opt_cfg = stagelib.opt_config(config, tc.steps * rl.epochs * rl.minibatches)

    self.mesh = mesh = stagelib.make_mesh(config)
    mesh.check_batch("rlhf.batch_size", rl.batch_size)
    mesh.check_batch(
      "a minibatch (rlhf.batch_size / rlhf.minibatches)",
      rl.batch_size // rl.minibatches,
      self.opt_cfg.grad_accum,
    )
    self.shared = rl.critic == "shared"
    kind = "lm_value" if self.shared else "lm"
    self.policy = stagelib.build_model(kind, self.model_cfg, self.opt_cfg, mesh, tc.seed, source)
    graphdefs = {"policy": self.policy.graphdef, "ref": self.policy.graphdef}
    if source is None:  # the reference is the policy's initial weights
      self.ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(self.policy.state.params)
    else:
      graphdefs["ref"], self.ref_params, _ = stagelib.frozen_params(
        "lm", self.model_cfg, mesh, source
      )

    self.reward_fn, self.reward_params, self.norm = None, None, {"gain": 1.0, "bias": 0.0}
    rm_source = None
    if rewards.is_function(rl.reward):
      self.reward_fn = rewards.load_function(rl.reward)
    else:
      rm_source = weights.resolve(rl.reward, state="reward")
      if tokenizer_to_json(rm_source.tokenizer) != tokenizer_to_json(tok):
        raise ValueError(
          f"the reward model {rm_source.describe()} reads another tokenizer than the policy: "
          f"it would score other tokens than the policy wrote"
        )
      rm_cfg = dataclasses.replace(rm_source.model_cfg, **no_dropout)
      graphdefs["reward"], self.reward_params, _ = stagelib.frozen_params(
        "scalar", rm_cfg, mesh, rm_source
      )
      self.norm = dict(rm_source.items.get("reward_norm", self.norm))

    if self.shared:  # the policy's value head is the critic
      self.critic = None
      graphdefs["critic"] = self.policy.graphdef
      self.states = {"policy": self.policy.state}
      self.state_shardings = {"policy": self.policy.shardings}
      self.steps = {
        "policy": stagelib.train_step(self.policy, mesh, SHARED_KEYS, ppo_shared_loss_fn(rl))
      }
    else:
      critic_source = weights.resolve(rl.critic_from) if rl.critic_from else (rm_source or source)
      critic_cfg = (
        self.model_cfg
        if critic_source is None
        else dataclasses.replace(critic_source.model_cfg, **no_dropout)
      )
      self.critic = stagelib.build_model(
        "scalar", critic_cfg, self.opt_cfg, mesh, tc.seed + 1, critic_source, head_init="zero"
      )
      graphdefs["critic"] = self.critic.graphdef
      self.states = {"policy": self.policy.state, "critic": self.critic.state}
      self.state_shardings = {"policy": self.policy.shardings, "critic": self.critic.shardings}
      self.steps = {
        "policy": stagelib.train_step(self.policy, mesh, POLICY_KEYS, ppo_policy_loss_fn(rl)),
        "critic": stagelib.train_step(self.critic, mesh, CRITIC_KEYS, ppo_value_loss_fn(rl)),
      }
    self.n_params = self.policy.n_params
    exact = self.model_cfg.vocab_size <= rl.exact_kl_vocab
    self.forward = jit_forward(graphdefs, mesh.mesh, mesh.rules, rl.temperature, exact)
    self.advantages = jax.jit(
      functools.partial(
        advantages,
        kl_estimator=rl.kl_estimator,
        whiten_rewards=rl.whiten_rewards,
        gamma=rl.gamma,
        lam=rl.lam,
      )
    )
    self.take = jax.jit(_take, out_shardings=mesh.batch_sharding())
    self.sampler = Sampler(self.policy.graphdef, mesh.mesh, mesh.rules)
    self.sampling = SamplingConfig(
      max_new_tokens=rl.response_len,
      temperature=rl.temperature,
      top_k=rl.top_k,
      top_p=rl.top_p,
      eos_id=tok.end_id,
      pad_id=tok.pad_id,
    )
    self.kl = KLController(rl.beta, rl.kl_controller, rl.kl_target, rl.kl_horizon)
    self.iteration = 0
    self._metrics = {}
    block, blocks = mesh.block(rl.batch_size)
    self._prompts = chat.prompt_iterator(
      self.records,
      tok,
      max_prompt_len=rl.max_prompt_len,
      batch_size=rl.batch_size // blocks,
      seed=rl.seed,
      field=rl.prompt_field,
      overflow=rl.prompt_overflow,
      process_index=block,
      process_count=blocks,
    )

  def models(self):
    if self.shared:
      return {"policy": ("lm_value", self.model_cfg)}
    return {"policy": ("lm", self.model_cfg), "critic": ("scalar", self.critic.cfg)}

  def rollout(self, prompts) -> tuple[rollout.Rollout, dict]:
    """Samples one response per prompt with the current policy."""
    rng = jax.random.fold_in(jax.random.PRNGKey(self.rl.seed), self.iteration)
    out = rollout.sample(
      self.sampler,
      self.states["policy"].params,
      prompts["prompt_tokens"],
      prompts["prompt_mask"],
      rng,
      self.sampling,
    )
    return out

  def completions(self, out: rollout.Rollout) -> list[str]:
    """Each response decoded, without its EOS."""
    tok, texts = self.tokenizer, []
    for ids, m in zip(out.response_tokens_BxN, out.response_mask_BxN):
      ids = [int(t) for t in ids[m > 0] if int(t) != tok.end_id]
      texts.append(tok.decode(ids))
    return texts

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
    fwd = {k: jnp.concatenate([p[k] for p in parts]) for k in parts[0]}
    if self.reward_fn is not None:
      records = [self.records[int(i)] for i in prompts["_index"]]
      raw = np.asarray(rewards.call(self.reward_fn, rl.reward, records, self.completions(out)))
    else:
      raw = np.asarray(jax.device_get(fwd["rm_scores"]))
    scores = final_scores(raw, self.norm, out.eos_B, rl.missing_eos_penalty)
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
      "eos_rate": float(np.mean(out.eos_B)),
      "response_length": float(np.mean(out.response_mask_BxN.sum(axis=1))),
      "logprob_gap_max": float(gap.max()) if gap.size else 0.0,
    }
    if "exact_kl" in host:
      figures["kl_exact"] = float(np.mean((host["exact_kl"] * mask).sum(axis=1)))
    return full, figures

  def updates(self):
    rl = self.rl
    t0 = time.perf_counter()
    prompts = next(self._prompts)
    out = self.rollout(prompts)
    t1 = time.perf_counter()
    full, figures = self.score(prompts, out)
    jax.block_until_ready(full)
    t2 = time.perf_counter()
    self.last = (out, full)  # this iteration's rollout and scored batch, for inspection
    size = rl.batch_size // rl.minibatches
    for epoch in range(rl.epochs):
      # A fresh permutation each epoch, the same on every process and after a resume.
      order = np.random.default_rng([rl.seed, self.iteration, epoch]).permutation(rl.batch_size)
      for k in range(rl.minibatches):
        mb = self.take(full, jnp.asarray(order[k * size : (k + 1) * size]))
        if self.shared:
          yield "policy", {key: mb[key] for key in SHARED_KEYS}
        else:
          yield "policy", {key: mb[key] for key in POLICY_KEYS}
          yield "critic", {key: mb[key] for key in CRITIC_KEYS}
    jax.block_until_ready(self.states)
    t3 = time.perf_counter()
    self.kl.update(figures["kl"], rl.batch_size)
    self.iteration += 1
    figures.update(rollout_s=t1 - t0, scoring_s=t2 - t1, update_s=t3 - t2)
    self._metrics = figures

  def iteration_metrics(self):
    return self._metrics

  def host_state(self) -> dict:
    return {"prompts": self._prompts.get_state(), "beta": self.kl.beta, "iteration": self.iteration}

  def load_host_state(self, state: dict) -> None:
    from train import checkpoint as ckpt

    if "prompts" in state:
      own = self._prompts.get_state()
      self._prompts.set_state(ckpt.data_state_for_this_process(state["prompts"], own))
    self.kl.beta = float(state.get("beta", self.kl.beta))
    self.iteration = int(state.get("iteration", 0))

  def evaluate(self) -> dict:
    """The last iteration's figures, as of this evaluation."""
    return {k: v for k, v in self._metrics.items() if not k.endswith("_s")}

  def close(self):
    self._prompts.close()


def build(config, workdir: str) -> PPO:
  return PPO(config, workdir)
