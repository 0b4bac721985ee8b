"""Direct preference optimisation as a stage: the policy trained on preference pairs against
reference logprobs computed once, before training, and stored with the pairs."""

from __future__ import annotations

import contextlib
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import chat
from data.arrays import padded_batches
from model import axes, layers
from model.logprobs import token_logprobs
from rlhf.reward import RMDataConfig, pair_texts, preference_pairs
from train import distributed, metrics, optim
from train import stage as stagelib
from train import step as steplib
from train.pretrain import check_query_blocks, lm_model_config

SIDES = ("chosen", "rejected")
ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
REF_KEYS = ("ref_chosen", "ref_rejected")  # the reference's sequence logprobs, one per pair
# A batch: both sides' shifted rows (data.chat.pack_preferences(shift=True)) and the reference.
DPO_KEYS = tuple(f"{s}_{k}" for s in SIDES for k in ROW_KEYS) + REF_KEYS
LOSSES = ("sigmoid", "ipo")
STATE = "policy"


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """config.rlhf for DPO; configs/experiments/dpo_chat.py documents each field."""

  loss: str = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0
  nll_coef: float = 0.0

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"rlhf.loss={self.loss!r} is unknown; choose one of {LOSSES}")
    if not self.beta > 0:
      raise ValueError(f"rlhf.beta must be > 0, got {self.beta}")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"rlhf.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
    if self.nll_coef < 0:
      raise ValueError(f"rlhf.nll_coef must be >= 0, got {self.nll_coef}")


# ---------------------------------------------------------------- pure functions


def dpo_loss(d_B, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0):
  """Per-pair loss of D = (logpi_c - logref_c) - (logpi_r - logref_r), beta applied once:
  sigmoid -(1 - eps) log sigmoid(beta D) - eps log sigmoid(-beta D); ipo (D - 1/(2 beta))^2."""
  if loss == "ipo":
    return jnp.square(d_B - 1.0 / (2.0 * beta))
  eps = label_smoothing
  return -(1.0 - eps) * jax.nn.log_sigmoid(beta * d_B) - eps * jax.nn.log_sigmoid(-beta * d_B)


def sequence_logprobs(model, batch, rng=None):
  """(logp_chosen_B, logp_rejected_B, nll_chosen_B): the sums over completion tokens
  (loss_mask) of log pi(target), from one forward over the 2B rows (pair i's rows side by side,
  so the rows a device holds stay on it), and each chosen row's mean token NLL."""

  def both(key):
    chosen, rejected = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
    return jnp.stack([chosen, rejected], axis=1).reshape(-1, *chosen.shape[1:])

  logits_2BxLxV = model(both("inputs"), both("positions"), both("segment_ids"), dropout_rng=rng)
  mask_2BxL = both("loss_mask")
  logp_2BxL = token_logprobs(logits_2BxLxV, both("targets"), 1.0) * mask_2BxL
  logp_Bx2 = jnp.sum(logp_2BxL, axis=1).reshape(-1, 2)
  chosen_tokens_B = jnp.sum(batch["chosen_loss_mask"], axis=1)
  nll_B = -logp_Bx2[:, 0] / jnp.maximum(chosen_tokens_B, 1.0)
  return logp_Bx2[:, 0], logp_Bx2[:, 1], nll_B


def make_loss_fn(cfg: DPOConfig):
  """loss_fn(model, batch, rng) -> (loss summed over pairs, pair count, per-pair metric sums).
  The optional NLL term is nll_coef times each pair's mean NLL over its chosen tokens."""

  def loss_fn(model, batch, rng=None):
    logp_c_B, logp_r_B, nll_B = sequence_logprobs(model, batch, rng)
    # Rows of zeros fill an evaluation's last batch: they are no pair.
    valid_B = (jnp.max(batch["chosen_segment_ids"], axis=1) > 0).astype(jnp.float32)
    ratio_c_B = logp_c_B - batch["ref_chosen"]
    ratio_r_B = logp_r_B - batch["ref_rejected"]
    loss_B = dpo_loss(ratio_c_B - ratio_r_B, cfg.beta, cfg.loss, cfg.label_smoothing)
    if cfg.nll_coef:
      loss_B = loss_B + cfg.nll_coef * nll_B
    reward_c_B, reward_r_B = cfg.beta * ratio_c_B, cfg.beta * ratio_r_B
    total = lambda x_B: jnp.sum(jnp.where(valid_B > 0, x_B, 0.0))
    metric_sums = {
      "chosen_reward": total(reward_c_B),
      "rejected_reward": total(reward_r_B),
      "reward_margin": total(reward_c_B - reward_r_B),
      "reward_accuracy": total((reward_c_B > reward_r_B).astype(jnp.float32)),
      "chosen_logp": total(logp_c_B),
      "rejected_logp": total(logp_r_B),
      "chosen_nll": total(nll_B),
    }
    return total(loss_B), jnp.sum(valid_B), metric_sums

  return loss_fn


# ---------------------------------------------------------------- the stage


def _batch_shardings(mesh: stagelib.Mesh) -> dict:
  return {k: mesh.batch_sharding(1 if k in REF_KEYS else 2) for k in DPO_KEYS}


class DPO(stagelib.BatchStage):
  """A language model ('policy') trained with DPO (or IPO) on preference pairs. The reference
  (train.init_from's weights, or a copy of the random init) scores every pair once, before
  training; its logprobs travel with the pairs, so the update step never takes a frozen model.
  Evaluation is the held-out loss, implicit rewards, their margin and accuracy."""

  name = "dpo"
  state_name = STATE

  def __init__(self, config, workdir: str):
    self.train_cfg = tc = stagelib.section(stagelib.TrainConfig, config.train, "train")
    self.data_cfg = dc = stagelib.section(RMDataConfig, config.data, "data")
    self.dpo_cfg = stagelib.section(DPOConfig, config.get("rlhf", {}), "rlhf")
    check_query_blocks(config, dc.seq_len)
    source = stagelib.init_source(tc)
    train, held_out = preference_pairs(dc)
    self.tokenizer = stagelib.stage_tokenizer(
      dc.tokenizer, dc.vocab_size, source, pair_texts(train + held_out), workdir
    )
    self.model_cfg = lm_model_config(config, self.tokenizer, source, dc.seq_len)
    self.opt_cfg = stagelib.opt_config(config, tc.steps)

    self.mesh = mesh = stagelib.make_mesh(config)
    mesh.check_batch("data.batch_size", dc.batch_size, self.opt_cfg.grad_accum)
    mesh.check_batch("data.eval_batch_size", dc.eval_batch_size)
    pack = lambda pairs: chat.pack_preferences(
      pairs, self.tokenizer, seq_len=dc.seq_len, overflow=dc.overflow, shift=True
    )
    self.train_arrays, self.train_stats = pack(train)
    if not self.train_arrays:
      raise ValueError(f"no training pair of {dc.path} fits data.seq_len={dc.seq_len}")
    self.val_arrays, self.val_stats = pack(held_out) if held_out else (None, {})
    self.model = stagelib.build_model("lm", self.model_cfg, self.opt_cfg, mesh, tc.seed, source)
    self.graphdef = self.model.graphdef
    self.states = {STATE: self.model.state}
    self.state_shardings = {STATE: self.model.shardings}
    self.n_params = self.model.n_params

    # The reference scores every pair now, then is dropped.
    t0 = time.perf_counter()
    base = self.model_cfg.lora_rank > 0  # a LoRA policy's base weights: its adapters off
    if base:
      ref_graphdef, ref_params = self.graphdef, self.model.state.params
    elif source is None:  # the reference is the policy's initial weights
      ref_graphdef = self.graphdef
      ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(self.model.state.params)
    else:
      ref_graphdef, ref_params, _ = stagelib.frozen_params("lm", self.model_cfg, mesh, source)
    self._add_reference(self.train_arrays, ref_graphdef, ref_params, base)
    if self.val_arrays is not None:
      self._add_reference(self.val_arrays, ref_graphdef, ref_params, base)
    del ref_params
    self.reference_s = time.perf_counter() - t0  # the one-off reference pass, compile included

    loss_fn = make_loss_fn(self.dpo_cfg)
    common = dict(graphdef=self.graphdef, mesh=mesh.mesh, rules=mesh.rules)
    self.steps = {
      STATE: steplib.jit_train_step(
        self.model.shardings,
        _batch_shardings(mesh),
        loss_fn=loss_fn,
        optimizer=self.model.optimizer,
        lr_schedule=optim.schedule(self.opt_cfg),
        grad_accum=self.opt_cfg.grad_accum,
        grad_reduce=mesh.grad_reduce,
        count_name="pairs",
        trainable=self.model.trainable,
        **common,
      )
    }
    self.eval_step = steplib.jit_eval_step(
      self.model.shardings.params, _batch_shardings(mesh), loss_fn=loss_fn, **common
    )
    self.tokens_per_iteration = 2 * dc.batch_size * dc.seq_len
    self.flops_per_token = metrics.flops_per_token(self.model_cfg, self.n_params, dc.seq_len)
    self._it = self.batch_iterator("dpo")

  def _add_reference(self, arrays: dict, graphdef, params, adapters_off=False) -> None:
    """Adds ref_chosen and ref_rejected (R,): the reference's sequence logprobs of each pair,
    in batches of data.eval_batch_size, without dropout (and with `adapters_off`, without the
    LoRA adapters)."""
    mesh, dc = self.mesh, self.data_cfg

    def forward(p, batch):
      off = layers.adapters_off() if adapters_off else contextlib.nullcontext()
      with axes.axis_rules(mesh.mesh, mesh.rules), off:
        logp_c_B, logp_r_B, _ = sequence_logprobs(nnx.merge(graphdef, p), batch)
      return logp_c_B, logp_r_B

    forward = jax.jit(forward)
    rows = {k: v for k, v in arrays.items() if k not in REF_KEYS}
    n = len(rows["chosen_inputs"])
    block, blocks = mesh.block(dc.eval_batch_size)
    chosen, rejected = [], []
    for batch in padded_batches(rows, dc.eval_batch_size, block=block, blocks=blocks):
      logp_c_B, logp_r_B = forward(params, mesh.shard(batch))
      chosen.append(distributed.gather(logp_c_B))
      rejected.append(distributed.gather(logp_r_B))
    arrays["ref_chosen"] = np.concatenate(chosen)[:n].astype(np.float32)
    arrays["ref_rejected"] = np.concatenate(rejected)[:n].astype(np.float32)

  @property
  def params(self):
    return self.states[STATE].params

  def models(self):
    return {STATE: ("lm", self.model_cfg)}

  def checkpoint_items(self):
    return {"chat_template": chat.template_item(self.tokenizer)}

  def evaluate(self, params=None) -> dict:
    """Held-out DPO loss, implicit rewards, their margin and accuracy, and logprobs, per pair."""
    totals = self.held_out_totals(params)
    return {} if totals is None else metrics.pair_eval_result(totals, "dpo_loss")


def build(config, workdir: str) -> DPO:
  return DPO(config, workdir)
