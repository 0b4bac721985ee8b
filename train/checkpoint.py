"""Orbax checkpoints of the train state, data iterator state, config and tokenizer; resume and
restore onto any mesh layout."""
from __future__ import annotations

import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the last `keep` checkpoints under `directory`, saved asynchronously.

  A save that is interrupted (kill -9) never becomes the latest step: orbax writes into a
  temporary directory and renames it only when complete.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, config: dict,
           tokenizer: dict | None = None) -> bool:
    """`tokenizer` is data.tokenizer.tokenizer_to_json's: a checkpoint decodes on its own."""
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_state is not None:
      args["data"] = ocp.args.JsonSave(data_state)
    if tokenizer is not None:
      args["tokenizer"] = ocp.args.JsonSave(tokenizer)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict | None]:
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs), which
    may be another layout than the one that saved."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
    if has_data:
      items["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], (restored["data"] if has_data else None)

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings`: a restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def data_state_for_this_process(saved: dict, own: dict) -> dict:
  """Hosts read in lockstep (the same batch index on every host), so the state saved by the
  primary host restores every host once its own slice (process_index) is put back in."""
  saved_config = dict(saved.get("config", {}))
  own_config = own["config"]
  mismatch = {k: (saved_config.get(k), v) for k, v in own_config.items()
              if k != "process_index" and saved_config.get(k) != v}
  if mismatch:
    raise ValueError(f"the checkpoint's data state does not fit this run's data pipeline "
                     f"(field: (saved, now)): {mismatch}")
  return {"grain": saved["grain"], "config": dict(own_config)}


class StopSignal:
  """Turns SIGTERM and SIGINT into a flag the loop checks between steps, so it can save a
  checkpoint and exit cleanly (a preempted job resumes where it stopped)."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def load_for_inference(workdir: str, step: int | None = None):
  """(ModelConfig, the config's data section, params, tokenizer) from a run's checkpoint, for
  sampling or export. Only the parameters are read, onto this process's first device. The
  tokenizer is the one saved in the checkpoint; checkpoints written before it was saved there
  fall back to the run's `workdir/tokenizer`."""
  from flax import nnx

  from data.tokenizer import load_tokenizer, tokenizer_from_json
  from model.config import ModelConfig
  from train.plan import abstract_params

  # Absolute: orbax's StandardCheckpointer reads no metadata from a relative path.
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  manager = Checkpointer(directory, async_save=False)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {directory}; train first with "
                            f"python -m train.main --workdir={workdir}")
  config = manager.restore_config(step)
  manager.close()
  path = os.path.join(directory, str(step))
  if os.path.isdir(os.path.join(path, "tokenizer")):
    tokenizer = tokenizer_from_json(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        os.path.join(path, "tokenizer")), where=os.path.join(path, "tokenizer"))
  else:
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
  model_fields = dict(config["model"])
  model_fields["vocab_size"] = model_fields.get("vocab_size") or tokenizer.vocab_size
  model_cfg = ModelConfig(**model_fields)
  # The parameters alone (not the optimizer's moments, twice their size), onto one device,
  # whatever layout the run saved with, in the model's own tree (layer keys are ints).
  abstract = nnx.to_pure_dict(abstract_params(model_cfg))
  # A partial restore fills what the checkpoint lacks with placeholders: compare first.
  saved = ocp.StandardCheckpointer().metadata(os.path.join(path, "state")).item_metadata
  want, have = _leaf_paths(abstract), _leaf_paths(dict(saved).get("params", {}))
  if want != have:
    raise ValueError(
        f"{path}: the checkpoint's parameters do not match the model its config builds; "
        f"missing from the checkpoint: {sorted(want - have)[:5]}, not in the model: "
        f"{sorted(have - want)[:5]}")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)}
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
  state = ocp.PyTreeCheckpointer().restore(
      os.path.join(path, "state"),
      args=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True))
  return model_cfg, config.get("data", {}), state["params"], tokenizer


def _leaf_paths(tree) -> set[str]:
  """'blocks/0/attn/q/kernel'-style paths of a tree's leaves (int and str keys alike)."""
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(tree)}
