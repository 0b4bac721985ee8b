"""What a training stage is to the loop, and the pieces every stage builds the same way: the
mesh, models (random or from weights) with their optimizers, and jitted steps."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from model import lora
from model.config import ModelConfig
from train import distributed, metrics, optim, partitioning, weights
from train import step as steplib
from train.sources import Source


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop settings; configs/base.py documents each field."""

  steps: int = 1000
  seed: int = 0
  log_every: int = 10
  eval_every: int = 250
  eval_batches: int = 0
  checkpoint_every: int = 250
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  max_seconds: float = 0.0
  z_loss: float = 0.0
  peak_flops: float = 0.0
  sample_prompt: str = ""
  sample_tokens: int = 200
  sample_temperature: float = 0.8
  sample_top_k: int = 0
  tensorboard: bool = True
  progress: bool = True
  init_from: str = ""
  init_step: int = 0
  init_state: str = ""
  nonfinite: str = "stop"
  allow_config_change: bool = False

  def __post_init__(self):
    if self.nonfinite not in ("stop", "skip"):
      raise ValueError(f"config.train.nonfinite is {self.nonfinite!r}; choose 'stop' or 'skip'")


def section(cls, values: Mapping[str, Any], name: str):
  """A frozen dataclass from a config section, naming any field it does not know."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"config.{name} has unknown fields {unknown}; known: {sorted(known)}")
  return cls(**dict(values))


class Stage:
  """What differs between stages (pretraining, SFT, reward model, PPO, DPO, GRPO). The loop
  in train/loop.py owns what they share: compile, signals, logging, progress, checkpoint and
  evaluation cadence, and the time limit.

  A stage has `states` (name -> TrainState: one model and its optimizer each), their
  `state_shardings`, and `steps` (name -> the one train step, jitted for that state). One
  loop iteration runs `updates()`, which yields (state name, batch) pairs; the loop applies
  that state's step to each, in order, and stores the new state back in `states` before it
  asks for the next pair (so an RL stage can roll out with the policy it just updated).
  """

  name = "stage"
  train_cfg: TrainConfig
  tokenizer: Any = None
  states: dict
  state_shardings: dict
  steps: dict
  n_params: int = 0
  tokens_per_iteration: int = 0  # for tokens/s; 0 when a stage has no such rate
  flops_per_token: float = 0.0  # for MFU; 0 when unknown
  echo_samples: bool = False  # print evaluation samples to the log, not only TensorBoard
  # State -> the setting its weights start from, where not train.init_from (a PPO critic).
  weights_from: dict[str, str] = {}

  def updates(self) -> Iterator[tuple[str, Any]]:
    raise NotImplementedError

  def iteration_metrics(self) -> dict[str, float]:
    """Host-side figures of the iteration just run (rollout statistics, time split)."""
    return {}

  def host_state(self) -> dict:
    """JSON that a resume needs besides the states: data iterators, controllers."""
    return {}

  def load_host_state(self, state: dict) -> None:
    del state

  def evaluate(self) -> dict[str, float]:
    return {}

  def samples(self, seed: int) -> dict[str, str]:
    """Texts to show at each evaluation (TensorBoard tag -> text)."""
    del seed
    return {}

  def models(self) -> dict[str, tuple[str, ModelConfig]]:
    """State name -> (model kind, ModelConfig): written with every checkpoint."""
    return {}

  def checkpoint_items(self) -> dict[str, Any]:
    """Other JSON a checkpoint carries (the chat template, ...)."""
    return {}

  def close(self) -> None:
    pass


class BatchStage(Stage):
  """A stage that trains one state, `state_name`, on batches from one resumable iterator
  (`self._it`): SFT, the reward model, DPO."""

  state_name = "model"

  def updates(self):
    yield self.state_name, self.mesh.shard(next(self._it))

  def host_state(self) -> dict:
    return {"data": self._it.get_state()}

  def batch_iterator(self, kind: str):
    """The resumable iterator over `train_arrays` in batches of data.batch_size, this
    process's block of each, shuffled by data.seed."""
    from data import arrays

    dc = self.data_cfg
    block, blocks = self.mesh.block(dc.batch_size)
    return arrays.array_iterator(
      self.train_arrays,
      self.train_stats,
      kind=kind,
      batch_size=dc.batch_size // blocks,
      seed=dc.seed,
      process_index=block,
      process_count=blocks,
      worker_count=dc.worker_count,
    )

  def load_host_state(self, state: dict) -> None:
    from train import checkpoint as ckpt

    if "data" in state:
      self._it.set_state(ckpt.data_state_for_this_process(state["data"], self._it.get_state()))

  def close(self):
    self._it.close()

  def held_out_totals(self, params=None) -> dict | None:
    """Sums of the eval step's outputs over the held-out rows (`self.val_arrays`, padded into
    batches of data.eval_batch_size; at most train.eval_batches of them), or None when
    nothing is held out."""
    if self.val_arrays is None:
      return None
    from data import arrays

    size = self.data_cfg.eval_batch_size
    block, blocks = self.mesh.block(size)
    batches = arrays.padded_batches(self.val_arrays, size, block=block, blocks=blocks)
    params = self.params if params is None else params
    return metrics.sum_eval(self.eval_step, params, batches, self.mesh, self.train_cfg.eval_batches)


def opt_config(config, total_steps: int) -> optim.OptimConfig:
  """config.opt, its schedule as long as the run's optimizer steps unless it says otherwise."""
  fields = dict(config.opt)
  fields["total_steps"] = fields.get("total_steps") or total_steps
  return section(optim.OptimConfig, fields, "opt")


def build_stage(config, workdir: str) -> Stage:
  """The stage that `config.stage` names: a module with `build(config, workdir) -> Stage`."""
  name = config.get("stage", "train.pretrain") or "train.pretrain"
  try:
    module = importlib.import_module(name)
  except ModuleNotFoundError as e:
    raise ValueError(
      f"config.stage={name!r} names no module ({e}); stages are modules with a "
      f"build(config, workdir) function, e.g. train.pretrain, train.sft"
    ) from None
  if not hasattr(module, "build"):
    raise ValueError(f"config.stage={name!r}: module has no build(config, workdir) function")
  return module.build(config, workdir)


@dataclasses.dataclass
class Mesh:
  """The mesh and layout a run trains on."""

  mesh: Any
  rules: tuple
  grad_reduce: str

  def batch_sharding(self, ndim: int = 2):
    return partitioning.batch_sharding(self.mesh, self.rules, ndim)

  def check_batch(self, name: str, rows: int, grad_accum: int = 1):
    """`rows` split over the batch's mesh axes (and microbatches) and over processes."""
    partitioning.check_batch_size(rows, self.mesh, self.rules, grad_accum)
    if rows % jax.process_count():
      raise partitioning.PartitionError(
        f"{name}={rows} must be divisible by the process count ({jax.process_count()})"
      )

  def shard(self, batch):
    return partitioning.shard_batch(batch, self.mesh, self.rules)

  def block(self, rows: int) -> tuple[int, int]:
    """(block, blocks): which rows of a global batch this process reads."""
    return distributed.batch_block(self.batch_sharding(), rows)


def make_mesh(config) -> Mesh:
  layout_name, sizes, grad_reduce = partitioning.split_mesh_config(config.mesh)
  layout = partitioning.load_layout(layout_name, sizes)
  count = int(config.mesh.get("devices", 0) or 0)
  if count < 0 or count > jax.device_count():
    raise partitioning.PartitionError(
      f"mesh.devices={count}: there are {jax.device_count()} devices (0 uses them all)"
    )
  devices = jax.devices()[:count] if count else None
  return Mesh(partitioning.make_mesh(layout, devices), layout.rules, grad_reduce)


TOKENIZERS = ("char", "bpe", "unigram")


def stage_tokenizer(kind: str, vocab_size: int, source, texts, workdir: str):
  """The tokenizer of the weights a stage starts from; from scratch, one trained on the
  stage's texts once (`kind`: char, bpe or unigram) and kept in workdir/tokenizer, so a
  resumed run reads the same ids."""
  import os

  from data.tokenizer import CharTokenizer, load_tokenizer, train_sentencepiece

  if source is not None:
    if source.tokenizer is None:
      raise ValueError(
        f"{source.describe()} comes without a tokenizer this project can read (a Hugging "
        f"Face folder needs its tokenizer.json); add it, or start from one of our workdirs"
      )
    return source.tokenizer
  tok_dir = os.path.join(workdir, "tokenizer")
  if os.path.isdir(tok_dir):
    return load_tokenizer(tok_dir)
  if kind == "char":
    tok = CharTokenizer.from_text(texts)
  else:
    tok = train_sentencepiece(texts, vocab_size=vocab_size, model_type=kind)
  tok.save(tok_dir)
  return tok


def init_source(train_cfg: TrainConfig) -> Source | None:
  """Where the stage's weights come from (train.init_from), or None for a random init."""
  if not train_cfg.init_from:
    return None
  return weights.resolve(train_cfg.init_from, train_cfg.init_step, train_cfg.init_state)


@dataclasses.dataclass
class Model:
  """One trained model: its structure, TrainState and shardings, and optimizer."""

  kind: str
  cfg: ModelConfig
  graphdef: Any
  state: steplib.TrainState
  shardings: steplib.TrainState
  optimizer: Any
  opt_cfg: optim.OptimConfig
  trainable: Any = None  # None: every parameter trains; else a predicate on paths (LoRA)

  @property
  def n_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))


def _loader(kind, cfg, mesh: Mesh, seed, source, head_init):
  """load_params for step.init_sharded: reads `source` into the given shardings; a scalar
  model from a language model gets the LM's trunk and a freshly initialised head."""

  def load(param_shardings):
    abstract = weights.abstract_params(kind, cfg)
    target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, param_shardings
    )
    # LoRA adapters start fresh on weights that have none.
    base, _ = lora.split(target, lambda path: not lora.is_adapter(path))
    params = weights.read_params(source, kind, base, cfg)
    fresh = {"scalar": "head", "lm_value": "value_head"}.get(kind)
    fresh = fresh if fresh and fresh not in params else None  # a head the source lacks
    new = lambda path: lora.is_adapter(path) or path[0] == fresh
    made, _ = lora.split(param_shardings, new)
    if made:
      # Only what is new leaves the jit: XLA drops the rest of the init as dead code.
      init = jax.jit(
        lambda: lora.split(
          nnx.to_pure_dict(nnx.split(weights.make_model(kind, cfg, seed, head_init))[1]), new
        )[0],
        out_shardings=made,
      )
      from model import axes

      with axes.axis_rules(mesh.mesh, mesh.rules):
        params = lora.join(params, init())
    return params

  return load


def build_model(
  kind: str,
  cfg: ModelConfig,
  opt_cfg: optim.OptimConfig,
  mesh: Mesh,
  seed: int,
  source: Source | None = None,
  head_init: str = "reward",
) -> Model:
  """A model and its optimizer state, built directly into their shardings: randomly
  initialised, or with the weights of `source`, which no device ever holds whole."""
  make = lambda: weights.make_model(kind, cfg, seed, head_init)
  load = None if source is None else _loader(kind, cfg, mesh, seed, source, head_init)
  trainable = lora.trains if cfg.lora_rank else None
  graphdef, state, shardings, optimizer = steplib.init_sharded(
    make, opt_cfg, mesh.mesh, mesh.rules, seed, mesh.grad_reduce, load, trainable
  )
  return Model(kind, cfg, graphdef, state, shardings, optimizer, opt_cfg, trainable)


def frozen_params(kind: str, cfg: ModelConfig, mesh: Mesh, source: Source):
  """(graphdef, params, shardings) of a frozen model (a reference policy, a reward model):
  parameters alone, no optimizer state, read straight into the layout's shardings. It trains
  no adapters: a LoRA source comes with its adapters folded in."""
  cfg = cfg.replace(lora_rank=0)
  make = lambda: weights.make_model(kind, cfg, 0)
  graphdef, _, shardings = partitioning.abstract_init(make, mesh.mesh, mesh.rules)
  shardings = nnx.to_pure_dict(shardings)
  params = _loader(kind, cfg, mesh, 0, source, "reward")(shardings)
  return graphdef, params, shardings


def train_step(model: Model, mesh: Mesh, batch_keys, loss_fn, count_name: str = "tokens"):
  """The one train step, jitted for `model` with a batch of `batch_keys`, each sharded along
  the batch: 2-D arrays, or a dict of key -> number of dimensions."""
  ndims = batch_keys if isinstance(batch_keys, dict) else dict.fromkeys(batch_keys, 2)
  batch_shardings = {k: mesh.batch_sharding(n) for k, n in ndims.items()}
  return steplib.jit_train_step(
    model.shardings,
    batch_shardings,
    graphdef=model.graphdef,
    loss_fn=loss_fn,
    optimizer=model.optimizer,
    lr_schedule=optim.schedule(model.opt_cfg),
    grad_accum=model.opt_cfg.grad_accum,
    mesh=mesh.mesh,
    rules=mesh.rules,
    grad_reduce=mesh.grad_reduce,
    count_name=count_name,
    trainable=model.trainable,
  )


def eval_step(model: Model, mesh: Mesh, batch_keys, loss_fn):
  batch_shardings = {k: mesh.batch_sharding() for k in batch_keys}
  return steplib.jit_eval_step(
    model.shardings.params,
    batch_shardings,
    graphdef=model.graphdef,
    loss_fn=loss_fn,
    mesh=mesh.mesh,
    rules=mesh.rules,
  )
