"""Pretraining as a stage: next-token loss on packed token shards."""

from __future__ import annotations

import jax
import numpy as np

from data import corpus
from data.pipeline import eval_batches, pretrain_iterator
from model.config import ModelConfig
from model.sampling import Sampler, SamplingConfig, left_pad
from train import checkpoint as ckpt
from train import distributed, losses, metrics, weights
from train import stage as stagelib

LM_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def lm_model_config(config, tokenizer, source, seq_len: int):
  """The LM's config: from config.model, or from the weights it starts from; the vocabulary
  follows the tokenizer when model.vocab_size is 0. Checked against the data's lengths."""
  fields = dict(config.model)
  if source is None and fields.get("vocab_size", 0) == 0:
    fields["vocab_size"] = tokenizer.vocab_size
  if source is None:
    model_cfg = stagelib.section(ModelConfig, fields, "model")
  else:
    model_cfg = weights.model_config(fields, source)
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(
      f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
      f"{tokenizer.vocab_size}; set it to 0 to follow the tokenizer"
    )
  if model_cfg.position == "learned" and seq_len > model_cfg.max_seq_len:
    raise ValueError(f"data.seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
  return model_cfg


def check_query_blocks(config, seq_len: int):
  blocks = config.model.get("attention_query_blocks", 1)
  if isinstance(blocks, int) and blocks > 1 and seq_len % blocks:
    raise ValueError(
      f"model.attention_query_blocks={blocks} must divide "
      f"data.seq_len={seq_len} (other lengths would run unblocked)"
    )


def setup_lm(stage, source, seq_len: int, batch_size: int) -> None:
  """The one language model ('model') that pretraining and SFT train with the next-token loss:
  its state and shardings, its train and eval steps, and the rate figures. Reads the stage's
  train_cfg, model_cfg, opt_cfg and mesh."""
  z_loss = stage.train_cfg.z_loss
  stage.model = stagelib.build_model(
    "lm", stage.model_cfg, stage.opt_cfg, stage.mesh, stage.train_cfg.seed, source
  )
  stage.graphdef = stage.model.graphdef
  stage.states = {"model": stage.model.state}
  stage.state_shardings = {"model": stage.model.shardings}
  stage.n_params = stage.model.n_params
  loss_fn = lambda model, batch, rng: losses.lm_loss(model, batch, rng, z_loss=z_loss)
  stage.steps = {"model": stagelib.train_step(stage.model, stage.mesh, LM_KEYS, loss_fn)}
  stage.eval_step = stagelib.eval_step(stage.model, stage.mesh, LM_KEYS, loss_fn)
  stage.tokens_per_iteration = batch_size * seq_len
  stage.flops_per_token = metrics.flops_per_token(stage.model_cfg, stage.n_params, seq_len)


class Pretrain(stagelib.Stage):
  """One model ('model') trained on token shards; evaluation over the validation split and a
  sampled continuation of train.sample_prompt."""

  name = "pretrain"

  def __init__(self, config, workdir: str):
    self.train_cfg = tc = stagelib.section(stagelib.TrainConfig, config.train, "train")
    self.data_cfg = dc = stagelib.section(corpus.DataConfig, config.data, "data")
    check_query_blocks(config, dc.seq_len)
    source = stagelib.init_source(tc)
    # One process writes the shared data.
    self.tokenizer, self.train_dir, self.val_dir = distributed.primary_first(
      lambda: corpus.build(dc, workdir, progress=tc.progress)
    )
    if source is not None and source.tokenizer is not None:
      if source.tokenizer.vocab_size != self.tokenizer.vocab_size:
        raise ValueError(
          f"the data's tokenizer ({self.tokenizer.vocab_size} ids) is not the tokenizer of "
          f"{source.describe()} ({source.tokenizer.vocab_size} ids): continue pretraining on "
          f"data prepared with that tokenizer (data.corpus=shards)"
        )
    self.model_cfg = lm_model_config(config, self.tokenizer, source, dc.seq_len)
    prompt_len = len(self.tokenizer.encode(tc.sample_prompt, bos=dc.add_bos)) or 1
    if self.model_cfg.position == "learned" and prompt_len >= self.model_cfg.max_seq_len:
      raise ValueError(
        f"train.sample_prompt is {prompt_len} tokens; with learned positions it "
        f"must leave room to sample within model.max_seq_len="
        f"{self.model_cfg.max_seq_len}"
      )
    self.opt_cfg = stagelib.opt_config(config, tc.steps)

    self.mesh = stagelib.make_mesh(config)
    self.mesh.check_batch("data.batch_size", dc.batch_size, self.opt_cfg.grad_accum)
    self.mesh.check_batch("data.eval_batch_size", dc.eval_batch_size)
    setup_lm(self, source, dc.seq_len, dc.batch_size)
    self.sampler = None
    self._it = None

  @property
  def params(self):
    return self.states["model"].params

  def _iterator(self):
    """The training batches, opened on first use (building a stage reads no data)."""
    if self._it is None:
      dc = self.data_cfg
      # Each process reads the rows of every global batch that its devices hold.
      block, blocks = self.mesh.block(dc.batch_size)
      self._it = pretrain_iterator(
        self.train_dir,
        seq_len=dc.seq_len,
        batch_size=dc.batch_size // blocks,
        seed=dc.seed,
        process_index=block,
        process_count=blocks,
        worker_count=dc.worker_count,
        window_stride=dc.window_stride,
      )
    return self._it

  def updates(self):
    yield "model", self.mesh.shard(next(self._iterator()))

  def host_state(self) -> dict:
    return {"data": self._iterator().get_state()}

  def load_host_state(self, state: dict) -> None:
    if "data" in state:
      it = self._iterator()
      it.set_state(ckpt.data_state_for_this_process(state["data"], it.get_state()))

  def models(self):
    return {"model": ("lm", self.model_cfg)}

  def evaluate(self, params=None, max_batches: int | None = None) -> dict:
    """Loss and perplexity over the validation split (all of it when max_batches is 0)."""
    dc = self.data_cfg
    block, blocks = self.mesh.block(dc.eval_batch_size)
    batches = eval_batches(
      self.val_dir,
      seq_len=dc.seq_len,
      batch_size=dc.eval_batch_size // blocks,
      process_index=block,
      process_count=blocks,
    )
    max_batches = self.train_cfg.eval_batches if max_batches is None else max_batches
    params = self.params if params is None else params
    totals = metrics.sum_eval(self.eval_step, params, batches, self.mesh, max_batches)
    return metrics.lm_eval_result(totals)

  def samples(self, seed: int) -> dict[str, str]:
    return {"sample": self.sample_text(self.params, seed)}

  def sample_text(self, params, seed: int = 0) -> str:
    """One continuation of train.sample_prompt, decoded."""
    tc, tok = self.train_cfg, self.tokenizer
    prompt = tok.encode(tc.sample_prompt, bos=self.data_cfg.add_bos) if tc.sample_prompt else []
    prompt = prompt or [tok.start_id]
    cfg = self.model_cfg
    budget = cfg.max_seq_len - len(prompt) if cfg.position == "learned" else 10**9
    sampling = SamplingConfig(
      max_new_tokens=max(1, min(tc.sample_tokens, budget)),
      temperature=tc.sample_temperature,
      top_k=tc.sample_top_k,
      eos_id=tok.eos_id if self.data_cfg.add_eos else None,
      pad_id=tok.pad_id,
    )
    tokens, mask = left_pad([prompt], tok.pad_id)
    if self.sampler is None:
      self.sampler = Sampler(self.graphdef, self.mesh.mesh, self.mesh.rules)
    out = self.sampler(params, tokens, mask, jax.random.PRNGKey(seed), sampling)
    generated = np.asarray(out.tokens_BxN[0])[np.asarray(out.mask_BxN[0]) > 0]
    return tc.sample_prompt + tok.decode([int(t) for t in generated])

  def close(self):
    if self._it is not None:
      self._it.close()


def build(config, workdir: str) -> Pretrain:
  return Pretrain(config, workdir)
