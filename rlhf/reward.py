"""The reward model as a stage: Bradley-Terry on preference pairs, the score read at a sequence's
last real token, and a gain and bias that put a policy's samples at mean 0 and std 1."""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import chat, sources
from data.arrays import split_held_out
from data.sources import DataError
from data.tokenizer import tokenizer_to_json
from model import axes
from model.sampling import Sampler, SamplingConfig
from model.transformer import last_token_values
from train import metrics, optim, partitioning, weights
from train import stage as stagelib
from train import step as steplib
from train.pretrain import check_query_blocks, lm_model_config

SIDES = ("chosen", "rejected")
ROW_KEYS = ("inputs", "segment_ids", "positions")
# A batch: both sides' unshifted rows (data.chat.pack_preferences(shift=False)) and margins.
RM_KEYS = tuple(f"{s}_{k}" for s in SIDES for k in ROW_KEYS) + ("margin",)
STATE = "reward"  # the state (and checkpointed model) name other stages read
NORM_ITEM = "reward_norm"  # the checkpoint's JSON item {"gain", "bias"[, "samples"]}


@dataclasses.dataclass(frozen=True)
class RMDataConfig:
  """What the reward model reads; configs/experiments/rm_*.py documents each field."""

  path: str = ""
  val_path: str = ""
  val_fraction: float = 0.05
  tokenizer: str = "char"
  vocab_size: int = 2048
  seq_len: int = 256
  batch_size: int = 16
  eval_batch_size: int = 16
  overflow: str = "drop"
  seed: int = 0
  worker_count: int = 0

  def __post_init__(self):
    if not self.path:
      raise DataError(
        "data.path is empty: give the preference JSONL (files, a directory or a glob)"
      )
    if self.tokenizer not in stagelib.TOKENIZERS:
      raise DataError(
        f"data.tokenizer={self.tokenizer!r} is unknown; choose one of {', '.join(stagelib.TOKENIZERS)}"
      )
    if self.overflow not in chat.OVERFLOW:
      raise DataError(f"data.overflow={self.overflow!r}; choose one of {chat.OVERFLOW}")
    for name in ("seq_len", "batch_size", "eval_batch_size", "vocab_size"):
      if getattr(self, name) <= 0:
        raise DataError(f"data.{name} must be > 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class NormConfig:
  """config.rlhf for the reward model: how its scores are normalised."""

  norm_policy: str = ""
  norm_prompts: str = ""
  norm_samples: int = 64
  norm_temperature: float = 1.0
  norm_tokens: int = 64
  norm_seed: int = 0

  def __post_init__(self):
    for name in ("norm_samples", "norm_tokens"):
      if getattr(self, name) <= 0:
        raise ValueError(f"rlhf.{name} must be > 0, got {getattr(self, name)}")
    if self.norm_temperature <= 0:
      raise ValueError(f"rlhf.norm_temperature must be > 0, got {self.norm_temperature}")


# ---------------------------------------------------------------- pure functions


def bradley_terry(r_chosen_B, r_rejected_B, margin_B):
  """Per-pair loss -log sigmoid(r_chosen - r_rejected - margin)."""
  return -jax.nn.log_sigmoid(r_chosen_B - r_rejected_B - margin_B)


def pair_rewards(model, batch, rng=None):
  """(r_chosen_B, r_rejected_B) from one forward over the 2B rows. Each pair's rows sit side by
  side (2i chosen, 2i + 1 rejected), so the rows a device holds stay on it."""

  def both(key):
    chosen, rejected = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
    return jnp.stack([chosen, rejected], axis=1).reshape(-1, *chosen.shape[1:])

  segment_ids_2BxL = both("segment_ids")
  values_2BxL = model(both("inputs"), both("positions"), segment_ids_2BxL, dropout_rng=rng)
  rewards_Bx2 = last_token_values(values_2BxL, segment_ids_2BxL).reshape(-1, 2)
  return rewards_Bx2[:, 0], rewards_Bx2[:, 1]


def reward_loss(model, batch, rng=None):
  """Bradley-Terry summed over pairs, the pair count, and per-pair metric sums."""
  r_chosen_B, r_rejected_B = pair_rewards(model, batch, rng)
  # Rows of zeros fill an evaluation's last batch: they are no pair.
  valid_B = jnp.max(batch["chosen_segment_ids"], axis=1) > 0
  gap_B = jnp.where(valid_B, r_chosen_B - r_rejected_B, 0.0)
  loss_B = jnp.where(valid_B, bradley_terry(r_chosen_B, r_rejected_B, batch["margin"]), 0.0)
  valid_B = valid_B.astype(jnp.float32)
  metric_sums = {
    "accuracy": jnp.sum((gap_B > 0) * valid_B),
    "reward_gap": jnp.sum(gap_B),
    "chosen_reward": jnp.sum(jnp.where(valid_B > 0, r_chosen_B, 0.0)),
    "rejected_reward": jnp.sum(jnp.where(valid_B > 0, r_rejected_B, 0.0)),
  }
  return jnp.sum(loss_B), jnp.sum(valid_B), metric_sums


def score(graphdef, params, tokens_BxL, mask_BxL, positions_BxL=None):
  """Raw reward-model scores_B of whole sequences (prompt and response): the value at each
  row's last position where mask_BxL is 1, which is the response's <|end|> when it has one.
  Pads are found from the mask, never from a token id.

  Pure and jit-able with graphdef static; params are the "reward" state's (a pure dict). Rows
  may be left-padded (the prompt) and right-padded (after the response): masked positions are
  invisible to attention (segment id 0) and positions default to cumsum(mask) - 1, as the
  sampler numbers them, so a row scores as its real tokens alone would. Normalise with
  `normalized` and the checkpoint's "reward_norm" item."""
  mask_BxL = jnp.asarray(mask_BxL).astype(jnp.int32)
  if positions_BxL is None:
    positions_BxL = jnp.maximum(jnp.cumsum(mask_BxL, axis=1) - 1, 0)
  values_BxL = nnx.merge(graphdef, params)(tokens_BxL, positions_BxL, mask_BxL)
  return last_token_values(values_BxL, mask_BxL)


def normalized(scores, gain, bias):
  """gain * scores + bias: scores on the scale where the reference policy's samples have
  mean 0 and std 1 (lm-human-preferences), so a KL coefficient keeps its meaning."""
  return gain * scores + bias


def fit_norm(scores) -> dict:
  """The "reward_norm" item: gain and bias that give `scores` mean 0 and (population) std 1."""
  scores = np.asarray(scores, np.float64)
  mean, std = float(scores.mean()), float(scores.std())
  if not std > 1e-12:
    logging.warning("reward norm: %d samples all score %.6g; gain left at 1", len(scores), mean)
    return {"gain": 1.0, "bias": -mean, "samples": len(scores)}
  return {"gain": 1.0 / std, "bias": -mean / std, "samples": len(scores)}


# ---------------------------------------------------------------- the stage


def preference_pairs(dc: RMDataConfig) -> tuple[list, list]:
  """(training pairs, held-out pairs) from data.path and data.val_path or data.val_fraction."""
  pairs = list(sources.read_preferences(dc.path))
  if dc.val_path:
    return pairs, list(sources.read_preferences(dc.val_path))
  return split_held_out(pairs, dc.val_fraction, dc.seed)


def pair_texts(pairs) -> list[str]:
  return [t for p in pairs for t in (*(m["content"] for m in p.prompt), p.chosen, p.rejected)]


def _batch_shardings(mesh: stagelib.Mesh) -> dict:
  return {k: mesh.batch_sharding(1 if k == "margin" else 2) for k in RM_KEYS}


class RewardModel(stagelib.BatchStage):
  """A scalar-head model ('reward') trained on preference pairs; evaluation is the held-out
  Bradley-Terry loss, pairwise accuracy and mean reward gap. Every checkpoint carries the
  normalisation ("reward_norm") fitted to the current parameters."""

  name = "reward"
  state_name = STATE

  def __init__(self, config, workdir: str):
    self.train_cfg = tc = stagelib.section(stagelib.TrainConfig, config.train, "train")
    self.data_cfg = dc = stagelib.section(RMDataConfig, config.data, "data")
    self.norm_cfg = stagelib.section(NormConfig, config.get("rlhf", {}), "rlhf")
    check_query_blocks(config, dc.seq_len)
    source = stagelib.init_source(tc)
    train, held_out = preference_pairs(dc)
    self.tokenizer = stagelib.stage_tokenizer(
      dc.tokenizer, dc.vocab_size, source, pair_texts(train + held_out), workdir
    )
    self.model_cfg = lm_model_config(config, self.tokenizer, source, dc.seq_len)
    self._check_policy()
    self.opt_cfg = stagelib.opt_config(config, tc.steps)

    self.mesh = stagelib.make_mesh(config)
    self.mesh.check_batch("data.batch_size", dc.batch_size, self.opt_cfg.grad_accum)
    self.mesh.check_batch("data.eval_batch_size", dc.eval_batch_size)
    pack = lambda pairs: chat.pack_preferences(
      pairs, self.tokenizer, seq_len=dc.seq_len, overflow=dc.overflow, shift=False
    )
    self.train_arrays, self.train_stats = pack(train)
    self.val_arrays, self.val_stats = pack(held_out) if held_out else (None, {})
    self._train_pairs = train
    self.model = stagelib.build_model(
      "scalar", self.model_cfg, self.opt_cfg, self.mesh, tc.seed, source, head_init="reward"
    )
    self.graphdef = self.model.graphdef
    self.states = {STATE: self.model.state}
    self.state_shardings = {STATE: self.model.shardings}
    self.n_params = self.model.n_params
    common = dict(graphdef=self.graphdef, mesh=self.mesh.mesh, rules=self.mesh.rules)
    self.steps = {
      STATE: steplib.jit_train_step(
        self.model.shardings,
        _batch_shardings(self.mesh),
        loss_fn=reward_loss,
        optimizer=self.model.optimizer,
        lr_schedule=optim.schedule(self.opt_cfg),
        grad_accum=self.opt_cfg.grad_accum,
        grad_reduce=self.mesh.grad_reduce,
        count_name="pairs",
        trainable=self.model.trainable,
        **common,
      )
    }
    self.eval_step = steplib.jit_eval_step(
      self.model.shardings.params, _batch_shardings(self.mesh), loss_fn=reward_loss, **common
    )
    self.tokens_per_iteration = 2 * dc.batch_size * dc.seq_len
    self.flops_per_token = metrics.flops_per_token(self.model_cfg, self.n_params, dc.seq_len)
    self._it = self.batch_iterator("reward")
    self._score = jax.jit(self._in_rules(functools.partial(score, self.graphdef)))
    self._norm_rows = None  # the policy's samples (tokens_BxT, mask_BxT), drawn once
    self._norm: tuple[int, dict] | None = None  # (step, item) last computed

  def _in_rules(self, fn):
    def traced(*args):
      with axes.axis_rules(self.mesh.mesh, self.mesh.rules):
        return fn(*args)

    return traced

  def _check_policy(self):
    """A normalising policy must be a language model speaking the reward model's tokens."""
    nc = self.norm_cfg
    if not nc.norm_policy:
      return
    policy = weights.resolve(nc.norm_policy, field="rlhf.norm_policy")
    if policy.kind not in weights.LM_KINDS or policy.tokenizer is None:
      raise ValueError(
        f"rlhf.norm_policy={nc.norm_policy!r}: {policy.describe()} is no language model with "
        f"our tokenizer; give a pretraining or SFT workdir"
      )
    if tokenizer_to_json(policy.tokenizer) != tokenizer_to_json(self.tokenizer):
      raise ValueError(
        f"rlhf.norm_policy={nc.norm_policy!r} has another tokenizer than the reward model; "
        f"start the reward model from it (train.init_from) or from a run that shares it"
      )

  @property
  def params(self):
    return self.states[STATE].params

  def models(self):
    return {STATE: ("scalar", self.model_cfg)}

  def checkpoint_items(self):
    return {"chat_template": chat.template_item(self.tokenizer), NORM_ITEM: self.reward_norm()}

  def evaluate(self, params=None) -> dict:
    """Held-out loss, pairwise accuracy (chosen scored above rejected) and mean reward gap."""
    totals = self.held_out_totals(params)
    return {} if totals is None else metrics.pair_eval_result(totals, "bt_loss")

  # ------------------------------------------------------------ normalisation

  def scores(self, tokens_BxT, mask_BxT, params=None) -> np.ndarray:
    """Raw scores of whole sequences (see `score`), on the stage's mesh."""
    b = len(tokens_BxT)
    # The mesh splits the rows: fill with copies of the first row, return those asked for.
    fill = -b % partitioning.batch_divisor(self.mesh.mesh, self.mesh.rules)
    rows = lambda x: np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[:1], fill, 0)])
    params = self.params if params is None else params
    out = self._score(params, rows(tokens_BxT), rows(mask_BxT))
    return np.asarray(jax.device_get(out))[:b]

  def norm_rows(self) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BxT, mask_BxT): rlhf.norm_samples prompts (the first of rlhf.norm_prompts, or
    of the training pairs', cycled) left-padded, each followed by the policy's response, drawn
    once with key rlhf.norm_seed in one batch. Responses end at <|end|>."""
    if self._norm_rows is None:
      nc, dc, tok = self.norm_cfg, self.data_cfg, self.tokenizer
      if nc.norm_prompts:
        records = list(sources.read_prompts(nc.norm_prompts))
      else:
        records = [{"prompt": pair.prompt} for pair in self._train_pairs]
      records = [records[i % len(records)] for i in range(nc.norm_samples)]
      arrays, _ = chat.pack_prompts(records, tok, max_prompt_len=dc.seq_len)
      mask_BxP = arrays["prompt_mask"]
      start = int(np.argmax(mask_BxP.any(axis=0)))  # drop the columns that only pad
      tokens_BxP, mask_BxP = arrays["prompt_tokens"][:, start:], mask_BxP[:, start:]
      policy_cfg, _, policy_params, _ = weights.load_for_inference(
        nc.norm_policy, mesh=self.mesh.mesh, rules=self.mesh.rules
      )
      graphdef = nnx.graphdef(nnx.eval_shape(lambda: weights.make_model("lm", policy_cfg, 0)))
      sampler = Sampler(graphdef, self.mesh.mesh, self.mesh.rules)
      sampling = SamplingConfig(
        max_new_tokens=nc.norm_tokens,
        temperature=nc.norm_temperature,
        eos_id=tok.end_id,
        pad_id=tok.pad_id,
      )
      out = sampler(policy_params, tokens_BxP, mask_BxP, jax.random.PRNGKey(nc.norm_seed), sampling)
      self._norm_rows = (
        np.concatenate([tokens_BxP, np.asarray(out.tokens_BxN)], axis=1),
        np.concatenate([mask_BxP, np.asarray(out.mask_BxN)], axis=1),
      )
    return self._norm_rows

  def reward_norm(self) -> dict:
    """The "reward_norm" item for the current parameters, refitted only when they changed:
    {gain, bias, samples} from the policy's samples, or {gain: 1, bias: 0} without
    rlhf.norm_policy."""
    if not self.norm_cfg.norm_policy:
      return {"gain": 1.0, "bias": 0.0}
    step = int(jax.device_get(self.states[STATE].step))
    if self._norm is None or self._norm[0] != step:
      self._norm = (step, fit_norm(self.scores(*self.norm_rows())))
    return dict(self._norm[1])


def build(config, workdir: str) -> RewardModel:
  return RewardModel(config, workdir)
