"""Weights from elsewhere: one of our runs or a Hugging Face folder, loaded straight into a
stage's shardings (train.init_from), and a checkpoint's model for inference."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from model.config import ModelConfig
from model.transformer import ScalarModel, Transformer
from train import checkpoint as ckpt
from train import sources
from train.sources import Source

KINDS = ("lm", "scalar", "lm_value")  # lm_value: an LM with a value head (a shared critic)
LM_KINDS = ("lm", "lm_value")
# Model fields that belong to a run, never taken from the weights it starts from: its own
# config sets them, or they keep their defaults. Adapters are added to weights from anywhere
# (a LoRA run's come folded in), and a classifier's head is new on any trunk.
RUN_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "num_classes")
# Model fields a run may set on weights it starts from: how the model runs, not what it is.
RUNTIME_FIELDS = (
  "dropout",
  "attention_dropout",
  "dropout_prng",
  "dtype",
  "param_dtype",
  "remat",
  "attention_impl",
  "attention_query_blocks",
  "kv_bucket",
  "init_std",
  "scan_layers",
  *RUN_FIELDS,
)


def make_model(kind: str, cfg: ModelConfig, seed: int, head_init: str = "reward") -> nnx.Module:
  """An LM (`Transformer`) or a scalar-head model (`ScalarModel`, reward or value)."""
  if kind == "lm":
    return Transformer(cfg, rngs=nnx.Rngs(seed))
  if kind == "scalar":
    return ScalarModel(cfg, rngs=nnx.Rngs(seed), head_init=head_init)
  if kind == "lm_value":
    return Transformer(cfg, rngs=nnx.Rngs(seed), value_head=True)
  raise ValueError(f"model kind {kind!r} is unknown; choose one of {KINDS}")


def abstract_params(kind: str, cfg: ModelConfig) -> dict:
  """The parameters as a pure dict of ShapeDtypeStructs (layer keys are ints)."""
  state = nnx.split(nnx.eval_shape(lambda: make_model(kind, cfg, 0)))[1]
  return nnx.to_pure_dict(state)


def models_item(models: dict[str, tuple[str, ModelConfig]], bases: dict | None = None) -> dict:
  """The checkpoint item that says which state holds which model: a checkpoint of any stage
  then loads for inference or as another stage's starting point without its stage's code.
  `bases`: state -> Source.ref() of the weights it started from (a LoRA model's base)."""
  bases = bases or {}
  return {
    name: {"kind": kind, "model": dataclasses.asdict(cfg)}
    | ({"base": bases[name]} if bases.get(name) else {})
    for name, (kind, cfg) in models.items()
  }


def resolve(path: str, step: int = 0, state: str = "", field: str = "train.init_from") -> Source:
  """The weights at `path`: one of our workdirs (its latest step, or `step`) or a Hugging Face
  folder (config.json and safetensors). `field` names the setting that gave `path`, in
  errors. Inside `sources.pinned`, a resumed run reads the step its first start read."""
  if not path:
    raise ValueError(f"no weights given: set {field} to a workdir or Hugging Face folder")
  given, pin = path, sources.pin(path, step, state, field)
  if pin:
    path, step, state = pin["path"], pin["step"], pin["state"]
  if os.path.isdir(os.path.join(path, "checkpoints")):
    try:
      source = _resolve_workdir(path, step, state)
    except FileNotFoundError as e:
      if not pin:
        raise
      raise FileNotFoundError(
        f"{field}={given!r}: this run started from step {step} of {path} and resumes from the "
        f"same weights, but {e}. Restore that checkpoint, or start afresh in another --workdir"
      ) from None
  elif os.path.isfile(os.path.join(path, "config.json")):
    from model import hf_config, hf_files

    config = hf_files.read_config(path)
    tokenizer = None
    if os.path.exists(os.path.join(path, "tokenizer.json")):
      from data.hf_tokenizer import load_hf_tokenizer

      tokenizer = load_hf_tokenizer(path)
    cfg = hf_config.hf_config_to_model(config)
    source = Source("hf", path, None, "", "lm", cfg, config, tokenizer)
  else:
    raise FileNotFoundError(
      f"{field}={given!r} is neither one of our workdirs (no checkpoints/ in it) nor a "
      f"Hugging Face folder (no config.json in it)"
    )
  source = dataclasses.replace(source, field=field, given=given)
  sources.record(field, source.ref())
  return source


def _resolve_workdir(workdir: str, step: int, state: str) -> Source:
  from data.tokenizer import load_tokenizer, tokenizer_from_json

  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  manager = ckpt.Checkpointer(directory, async_save=False)
  try:
    steps = manager.manager.all_steps()
    if not steps:
      raise FileNotFoundError(
        f"no checkpoint under {directory}; train first with python -m train.main "
        f"--workdir={workdir}"
      )
    step = step or max(steps)
    if step not in steps:
      raise FileNotFoundError(f"{directory} has no step {step}; it has steps {sorted(steps)}")
    items = manager.restore_items(
      step, ["config", "tokenizer", "models", "chat_template", "reward_norm"]
    )
  finally:
    manager.close()
  config = items["config"]
  if "tokenizer" in items:
    where = os.path.join(directory, str(step), "tokenizer")
    tokenizer = tokenizer_from_json(items["tokenizer"], where=where)
  else:  # written before checkpoints carried the tokenizer
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
  models = items.get("models")
  if models is None:  # written before checkpoints said which state holds which model
    models = {"model": {"kind": "lm", "model": dict(config["model"])}}
  if not state:
    lms = [n for n, m in models.items() if m["kind"] in LM_KINDS]
    state = lms[0] if len(lms) == 1 else (next(iter(models)) if len(models) == 1 else "")
    if not state:
      raise ValueError(f"{directory} step {step} holds models {sorted(models)}: name one")
  if state not in models:
    raise ValueError(f"{directory} step {step} has no model {state!r}; it has {sorted(models)}")
  fields = dict(models[state]["model"])
  fields["vocab_size"] = fields.get("vocab_size") or tokenizer.vocab_size
  return Source(
    "workdir",
    workdir,
    step,
    state,
    models[state]["kind"],
    ModelConfig(**fields),
    config,
    tokenizer,
    items,
  )


def model_config(fields: dict, source: Source | None) -> ModelConfig:
  """The run's ModelConfig: `fields` alone, or the source's architecture with the run's
  runtime fields (dropout, dtype, remat, ...). A run that asks for another architecture than
  its weights have gets an error naming the fields."""
  if source is None:
    return ModelConfig(**fields)
  merged = dataclasses.asdict(source.model_cfg)
  defaults = dataclasses.asdict(ModelConfig())
  merged.update({k: defaults[k] for k in RUN_FIELDS})
  differ = {}
  for k, v in fields.items():
    if k not in merged:
      raise ValueError(f"config.model has unknown field {k!r}; known: {sorted(merged)}")
    if k in RUNTIME_FIELDS:
      merged[k] = v
    elif v != merged[k] and not (k == "vocab_size" and v == 0):
      differ[k] = (v, merged[k])
  if source.format == "workdir" and merged["scan_layers"] != source.model_cfg.scan_layers:
    differ["scan_layers"] = (merged["scan_layers"], source.model_cfg.scan_layers)
  if differ:
    raise ValueError(
      f"config.model asks for another model than the weights of {source.describe()} (field: "
      f"(config, weights)): {differ}; drop these fields from config.model, or match the weights"
    )
  return ModelConfig(**merged)


def _leaf_paths(tree) -> set[str]:
  """'blocks/0/attn/q/kernel'-style paths of a tree's leaves (int and str keys alike)."""
  return {
    "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    for path, _ in jax.tree_util.tree_leaves_with_path(tree)
  }


def _quietly(fn):
  """fn() with orbax's warnings held back: reading one item of a composite checkpoint warns
  that the item has no metadata file of its own, which is how composites are written."""
  from absl import logging

  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    return fn()
  finally:
    logging.set_verbosity(level)


def _read_checkpoint(source: Source, target: dict) -> dict:
  """Reads the source state's parameters named by `target` (ShapeDtypeStructs carrying their
  shardings): each device reads only its shard, whatever layout saved them."""
  path = os.path.join(os.path.abspath(source.path), "checkpoints", str(source.step))
  if os.path.isdir(os.path.join(path, ckpt.STATES)):
    item, prefix = os.path.join(path, ckpt.STATES), (source.state,)
  else:
    item, prefix = os.path.join(path, ckpt.LEGACY_STATE), ()
  saved = dict(_quietly(lambda: ocp.StandardCheckpointer().metadata(item).item_metadata))
  for key in prefix:
    saved = dict(saved.get(key, {}))
  # orbax's partial restore fills what the checkpoint lacks with placeholders: compare first.
  want, have = _leaf_paths(target), _leaf_paths(dict(saved).get("params", {}))
  if want - have:
    raise ValueError(
      f"{item}: the checkpoint's parameters do not match the model; missing from the "
      f"checkpoint: {sorted(want - have)[:5]}, not in the model: {sorted(have - want)[:5]}"
    )
  tree = {"params": target}
  for key in reversed(prefix):
    tree = {key: tree}
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), tree)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  out = ocp.PyTreeCheckpointer().restore(
    item, args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)
  )
  for key in prefix:
    out = out[key]
  return out["params"]


def _read_hf(source: Source, target: dict, scan_layers: bool) -> dict:
  """Converts a Hugging Face folder's tensors on the host, then places each parameter's
  shards on their devices: no device holds more than its shards."""
  from model import convert, hf_files

  _, params = convert.hf_to_params(*hf_files.read_hf(source.path), scan_layers=scan_layers)
  want, have = _leaf_paths(target), _leaf_paths(params)
  if want - have:
    raise ValueError(f"{source.path}: parameters missing after conversion: {sorted(want - have)}")

  def place(path, spec):
    leaf = params
    for k in path:
      leaf = leaf[getattr(k, "key", getattr(k, "idx", k))]
    host = np.asarray(leaf).astype(spec.dtype)
    if host.shape != spec.shape:
      raise ValueError(
        f"{source.path}: {jax.tree_util.keystr(path)} has shape {host.shape}, the model "
        f"wants {spec.shape}"
      )
    return jax.make_array_from_callback(spec.shape, spec.sharding, lambda idx: host[idx])

  return jax.tree_util.tree_map_with_path(place, target)


def read_params(source: Source, kind: str, target: dict, cfg: ModelConfig) -> dict:
  """The source's parameters for a `kind` model, into `target`'s shardings. A scalar model
  started from a language model takes its trunk and keeps `target`'s head (which the caller
  fills: a fresh one); the returned tree then lacks 'head'."""
  if kind in LM_KINDS and source.kind == "scalar":
    raise ValueError(
      f"{source.describe()} holds a scalar-head (reward or value) model; a language model "
      f"cannot start from it"
    )
  if kind == "scalar" and source.kind in LM_KINDS:
    want = target["trunk"]
  elif kind == "lm_value" and source.kind == "lm":
    want = {k: v for k, v in target.items() if k != "value_head"}
  else:  # an LM from an LM with a value head reads all but that head
    want = target
  if source.model_cfg.lora_rank:
    got = _read_lora(source, want)
  elif source.format == "hf":
    got = _read_hf(source, want, cfg.scan_layers)
  else:
    got = _read_checkpoint(source, want)
  got = jax.tree.map(lambda x, t: x.astype(t.dtype), got, want)
  return {"trunk": got} if kind == "scalar" and source.kind in LM_KINDS else got


def _read_lora(source: Source, want: dict) -> dict:
  """A LoRA run's parameters named by `want` (a plain model's, in the source's layout), with
  its adapters folded into their kernels: the base weights those the run recorded it started
  from (exactly those, wherever it is resumed or read from), the adapters and heads from its
  checkpoint."""
  from model import lora

  base_ref = source.items.get("models", {}).get(source.state, {}).get("base")
  field = f"the base weights of {source.describe()}"
  if base_ref:
    base_source = resolve(base_ref["path"], base_ref["step"] or 0, base_ref["state"], field)
  else:  # written before checkpoints recorded the base: the run's train.init_from
    train_cfg = source.config.get("train", {})
    if not train_cfg.get("init_from"):
      raise ValueError(
        f"{source.describe()} trained LoRA adapters on a random init (no train.init_from): "
        f"there are no base weights to fold them into"
      )
    base_source = resolve(
      train_cfg["init_from"], train_cfg.get("init_step", 0), train_cfg.get("init_state", ""), field
    )
  plain_cfg = source.model_cfg.replace(lora_rank=0)
  trained_want, base_want = lora.split(want, lora.trains)
  base = read_params(base_source, source.kind, base_want, plain_cfg) if base_want else {}
  # The adapters (small) are read whole onto every device of `want`'s mesh, then folded into
  # the kernels on the kernels' shardings.
  sharding = jax.tree.leaves(want)[0].sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  has_kernel = lambda path: path[-1] not in lora.ADAPTERS or _has(want, path[:-1] + ("kernel",))
  trained, _ = lora.split(
    abstract_params(source.kind, source.model_cfg),
    lambda path: (
      lora.trains(path) and has_kernel(path) and (lora.is_adapter(path) or _has(want, path))
    ),
  )
  trained = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), trained
  )
  got = lora.join(base, _read_checkpoint(source, trained))
  out_shardings = jax.tree.map(lambda x: x.sharding, want)
  return jax.jit(lambda p: lora.merge(p, source.model_cfg)[0], out_shardings=out_shardings)(got)


def _has(tree: dict, path: tuple) -> bool:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return False
    tree = tree[key]
  return True


def load_for_inference(
  workdir: str, step: int | None = None, *, state: str = "", mesh=None, rules=()
):
  """(ModelConfig, the run's data config, params, tokenizer) of a run's model, for sampling,
  scoring or export: an LM, or a scalar (reward or value) model. Only the parameters are
  read (not the optimizer's moments), onto this process's first device, or sharded on `mesh`
  by the layout `rules` (train.partitioning's) so that no device holds the whole model."""
  from train import partitioning

  source = resolve(workdir, step or 0, state, field="workdir")
  kind = "lm" if source.kind == "lm_value" else source.kind  # the policy without its critic
  cfg = source.model_cfg.replace(lora_rank=0)  # a LoRA run's adapters come folded in
  abstract = abstract_params(kind, cfg)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  else:
    rules = partitioning.validate_rules(rules, mesh)
    model = nnx.eval_shape(lambda: make_model(kind, cfg, 0))
    specs = partitioning.param_specs(nnx.split(model)[1], mesh, rules)
    shardings = nnx.to_pure_dict(partitioning.to_shardings(specs, mesh))
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )
  params = read_params(source, kind, target, cfg)
  return cfg, source.config.get("data", {}), params, source.tokenizer
