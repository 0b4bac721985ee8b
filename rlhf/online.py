"""What the online RL stages (PPO, GRPO) share: the prompts and their iterator, the tokenizer,
the policy, the frozen reference, the reward (a model or a function), the sampler, the
rollout, decoding, scores and the host state a resume needs."""

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
from train import stage as stagelib
from train import weights
from train.pretrain import lm_model_config

NO_DROPOUT = {"dropout": 0.0, "attention_dropout": 0.0}  # RL updates need exact logprobs


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
  """The fields of config.rlhf every online stage reads; configs/experiments/ppo_chat.py and
  grpo_chat.py document each."""

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
  beta: float = 0.05
  minibatches: int = 1
  logratio_clamp: float = 20.0
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
    if self.temperature <= 0:
      raise ValueError(
        f"rlhf.temperature must be > 0 (it divides the logits of every logprob), got "
        f"{self.temperature}"
      )
    if self.beta < 0:
      raise ValueError(f"rlhf.beta must be >= 0, got {self.beta}")
    for name in ("batch_size", "response_len", "max_prompt_len", "minibatches"):
      if getattr(self, name) <= 0:
        raise ValueError(f"rlhf.{name} must be > 0, got {getattr(self, name)}")


def concatenated(parts) -> dict:
  """One dict from the per-minibatch dicts of a scoring pass, each key's arrays joined along
  the batch."""
  parts = list(parts)
  return {k: jnp.concatenate([p[k] for p in parts]) for k in parts[0]}


def final_scores(raw_B, norm: dict, eos_B, missing_eos_penalty: float) -> np.ndarray:
  """Scores as rewards see them: the reward model's normalised (gain * raw + bias), less the
  penalty for each response that never emitted EOS."""
  scores = norm["gain"] * np.asarray(raw_B, np.float64) + norm["bias"]
  return (scores - missing_eos_penalty * (~np.asarray(eos_B, bool))).astype(np.float32)


def take(batch, idx, *, mesh):
  """Rows `idx` of every array, each left sharded along the batch."""
  return jax.tree.map(
    lambda x: jax.lax.with_sharding_constraint(x[idx], mesh.batch_sharding(x.ndim)), batch
  )


class OnlineStage(stagelib.Stage):
  """The policy (state 'policy', with its optimizer), an optional frozen reference, the reward
  and the sampler. A subclass adds its own states and steps, and its `updates`."""

  def __init__(
    self,
    config,
    workdir: str,
    config_cls,
    *,
    updates_per_iteration: int,
    policy_kind: str = "lm",
    reference: bool = True,
  ):
    """`updates_per_iteration`: optimizer steps of the policy per iteration (the schedule's
    length is that times train.steps); `reference`: load the frozen reference (False when no
    KL term reads it). The update batch has rlhf.batch_size rows: one per prompt, whatever the
    samples per prompt."""
    self.train_cfg = tc = stagelib.section(stagelib.TrainConfig, config.train, "train")
    self.rl = rl = stagelib.section(config_cls, config.rlhf, "rlhf")
    self.source = source = stagelib.init_source(tc)
    self.records = [
      {**r, "_index": i}
      for i, r in enumerate(sources.read_prompts(rl.prompts, field=rl.prompt_field))
    ]
    texts = [r[rl.prompt_field] for r in self.records if isinstance(r[rl.prompt_field], str)]
    self.tokenizer = tok = stagelib.stage_tokenizer(
      rl.tokenizer, rl.vocab_size, source, texts, workdir
    )
    seq_len = rl.max_prompt_len + rl.response_len
    self.model_cfg = dataclasses.replace(
      lm_model_config(config, tok, source, seq_len), **NO_DROPOUT
    )
    self.opt_cfg = stagelib.opt_config(config, tc.steps * updates_per_iteration)

    self.mesh = mesh = stagelib.make_mesh(config)
    self.rows = rows = rl.batch_size
    mesh.check_batch("rlhf.batch_size", rows)
    if rows % rl.minibatches:
      raise ValueError(f"rlhf.batch_size={rows} must split into rlhf.minibatches={rl.minibatches}")
    mesh.check_batch(
      "a minibatch (rlhf.batch_size / rlhf.minibatches)",
      rows // rl.minibatches,
      self.opt_cfg.grad_accum,
    )
    self.policy = stagelib.build_model(
      policy_kind, self.model_cfg, self.opt_cfg, mesh, tc.seed, source
    )
    self.graphdefs = {"policy": self.policy.graphdef}
    self._ref_params = None
    # A LoRA policy is its own reference: its base weights, with the adapters off.
    self.ref_is_base = reference and self.model_cfg.lora_rank > 0
    if reference:
      self.graphdefs["ref"] = self.policy.graphdef
      if self.ref_is_base:
        pass  # no second copy of the model
      elif source is None:  # the reference is the policy's initial weights
        self._ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(self.policy.state.params)
      else:
        self.graphdefs["ref"], self._ref_params, _ = stagelib.frozen_params(
          "lm", self.model_cfg, mesh, source
        )

    self.reward_fn, self.reward_params, self.norm = None, None, {"gain": 1.0, "bias": 0.0}
    self.rm_source = None
    if rewards.is_function(rl.reward):
      self.reward_fn = rewards.load_function(rl.reward)
    else:
      self.rm_source = rm_source = weights.resolve(rl.reward, state="reward", field="rlhf.reward")
      if tokenizer_to_json(rm_source.tokenizer) != tokenizer_to_json(tok):
        raise ValueError(
          f"the reward model {rm_source.describe()} reads another tokenizer than the policy: "
          f"it would score other tokens than the policy wrote"
        )
      if rm_source.model_cfg.num_classes:
        raise ValueError(
          f"rlhf.reward={rl.reward!r} holds a {rm_source.model_cfg.num_classes}-way "
          f"classifier, not a reward model (one score per response); train one with "
          f"--config.stage=rlhf.reward, or name a reward function"
        )
      rm_cfg = dataclasses.replace(rm_source.model_cfg, **NO_DROPOUT)
      self.graphdefs["reward"], self.reward_params, _ = stagelib.frozen_params(
        "scalar", rm_cfg, mesh, rm_source
      )
      self.norm = dict(rm_source.items.get("reward_norm", self.norm))

    self.n_params = self.policy.n_params
    self.take = jax.jit(functools.partial(take, mesh=mesh))
    self.sampler = Sampler(self.policy.graphdef, mesh.mesh, mesh.rules)
    self.sampling = SamplingConfig(
      max_new_tokens=rl.response_len,
      temperature=rl.temperature,
      top_k=rl.top_k,
      top_p=rl.top_p,
      eos_id=tok.end_id,
      pad_id=tok.pad_id,
    )
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

  samples_per_prompt = 1  # responses sampled per prompt

  @property
  def ref_params(self):
    """The reference's parameters: a frozen copy, or a LoRA policy's own (scored with its
    adapters off, `ref_is_base`), or None without a reference."""
    return self.states["policy"].params if self.ref_is_base else self._ref_params

  def rollout(self, prompt_BxP, prompt_mask_BxP) -> rollout.Rollout:
    """Samples `samples_per_prompt` responses per prompt with the current policy; the key derives from
    the seed and the iteration, so a resumed run samples the same responses."""
    rng = jax.random.fold_in(jax.random.PRNGKey(self.rl.seed), self.iteration)
    return rollout.sample(
      self.sampler,
      self.states["policy"].params,
      prompt_BxP,
      prompt_mask_BxP,
      rng,
      self.sampling,
      self.samples_per_prompt,
    )

  def completions(self, out: rollout.Rollout) -> list[str]:
    """Each response decoded, without its EOS."""
    tok, texts = self.tokenizer, []
    for ids, m in zip(out.response_tokens_BxN, out.response_mask_BxN):
      ids = [int(t) for t in ids[m > 0] if int(t) != tok.end_id]
      texts.append(tok.decode(ids))
    return texts

  def scores(self, records, out: rollout.Rollout, rm_scores_B=None) -> tuple[np.ndarray, ...]:
    """(raw, final) scores of this process's episodes: the reward function's on the decoded
    completions, or the reward model's (`rm_scores_B`, from the scoring pass); final ones are
    normalised and carry the missing-EOS penalty."""
    if self.reward_fn is not None:
      raw = np.asarray(rewards.call(self.reward_fn, self.rl.reward, records, self.completions(out)))
    else:
      raw = np.asarray(jax.device_get(rm_scores_B))
    return raw, final_scores(raw, self.norm, out.eos_B, self.rl.missing_eos_penalty)

  def rollout_figures(self, out: rollout.Rollout) -> dict:
    lengths = out.response_mask_BxN.sum(axis=1)
    return {
      "eos_rate": float(np.mean(out.eos_B)),
      "response_length": float(np.mean(lengths)),
    }

  # ---- one iteration: the subclass supplies score and minibatch_updates; its config, the
  # number of passes over each rollout batch (rl.passes)

  def score(self, prompts: dict, out: rollout.Rollout) -> tuple[dict, dict]:
    """The scored batch the updates read, on the mesh, and the iteration's figures."""
    raise NotImplementedError

  def minibatch_updates(self, mb: dict):
    """(state, batch) pairs of one minibatch."""
    raise NotImplementedError

  def after_iteration(self, figures: dict) -> None:
    """Host-side updates after the iteration's last step (a KL controller)."""

  def updates(self):
    """Roll out, score once, then passes over the batch in minibatches, a fresh permutation
    each pass (the same on every process and after a resume); times each phase."""
    rl = self.rl
    t0 = time.perf_counter()
    prompts = next(self._prompts)
    out = self.rollout(prompts["prompt_tokens"], prompts["prompt_mask"])
    t1 = time.perf_counter()
    full, figures = self.score(prompts, out)
    jax.block_until_ready(full)
    t2 = time.perf_counter()
    self.last = (out, full)  # this iteration's rollout and scored batch, for inspection
    size = self.rows // rl.minibatches
    for p in range(rl.passes):
      order = np.random.default_rng([rl.seed, self.iteration, p]).permutation(self.rows)
      for k in range(rl.minibatches):
        yield from self.minibatch_updates(
          self.take(full, jnp.asarray(order[k * size : (k + 1) * size]))
        )
    jax.block_until_ready(self.states)
    t3 = time.perf_counter()
    self.after_iteration(figures)
    self.iteration += 1
    figures.update(rollout_s=t1 - t0, scoring_s=t2 - t1, update_s=t3 - t2)
    self._metrics = figures

  def iteration_metrics(self):
    return self._metrics

  def host_state(self) -> dict:
    return {"prompts": self._prompts.get_state(), "iteration": self.iteration}

  def load_host_state(self, state: dict) -> None:
    from train import checkpoint as ckpt

    if "prompts" in state:
      own = self._prompts.get_state()
      self._prompts.set_state(ckpt.data_state_for_this_process(state["prompts"], own))
    self.iteration = int(state.get("iteration", 0))

  def evaluate(self) -> dict:
    """The last iteration's figures, as of this evaluation."""
    return {k: v for k, v in self._metrics.items() if not k.endswith("_s")}

  def close(self):
    self._prompts.close()
