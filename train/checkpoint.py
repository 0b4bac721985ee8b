"""Orbax checkpoints of a stage's states and named JSON items; resume and restore onto any
mesh layout."""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp

STATES = "states"  # the item holding the stage's pytree of TrainStates
LEGACY_STATE = "state"  # checkpoints written before stages held one TrainState here


class Checkpointer:
  """Keeps the last `keep` checkpoints under `directory`, saved asynchronously.

  A checkpoint holds a stage's pytree of states (one or several models, each with its
  optimizer) and named JSON items (the config, the tokenizer, the stage's host state, ...).
  A save that is interrupted (kill -9) never becomes the latest step: orbax writes into a
  temporary directory and renames it only when complete.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, states, items: dict[str, Any]) -> bool:
    """`states` is any pytree of arrays; `items` maps a name to a JSON-able value (None
    values are left out)."""
    if STATES in items:
      raise ValueError(f"{STATES!r} names the states item; choose another JSON item name")
    args = {STATES: ocp.args.StandardSave(states)}
    args.update({k: ocp.args.JsonSave(v) for k, v in items.items() if v is not None})
    return self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def item_names(self, step: int) -> list[str]:
    path = os.path.join(self.directory, str(step))
    return sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))

  def restore(self, step: int, abstract_states) -> tuple[Any, dict[str, Any]]:
    """(states, JSON items) of `step`. The states land on the shardings carried by
    `abstract_states` (ShapeDtypeStructs), which may be another layout than the one that
    saved."""
    names = self.item_names(step)
    if STATES not in names and LEGACY_STATE in names:
      return self._restore_legacy(step, abstract_states, names)
    items = {STATES: ocp.args.StandardRestore(abstract_states)}
    items.update({n: ocp.args.JsonRestore() for n in names if n != STATES})
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATES], {n: restored[n] for n in names if n != STATES}

  def _restore_legacy(self, step, abstract_states, names):
    """One TrainState under 'state' and the data iterator under 'data'."""
    (name,) = abstract_states  # a stage of one state
    items = {LEGACY_STATE: ocp.args.StandardRestore(abstract_states[name])}
    items.update({n: ocp.args.JsonRestore() for n in names if n != LEGACY_STATE})
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    json_items = {n: restored[n] for n in names if n not in (LEGACY_STATE, "data")}
    if "data" in names:
      json_items["host"] = {"data": restored["data"]}
    return {name: restored[LEGACY_STATE]}, json_items

  def restore_items(self, step: int, names: list[str]) -> dict[str, Any]:
    """Only the named JSON items (those present) of `step`, no arrays."""
    names = [n for n in names if n in self.item_names(step)]
    if not names:
      return {}
    args = ocp.args.Composite(**{n: ocp.args.JsonRestore() for n in names})
    return dict(self.manager.restore(step, args=args))

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self.restore_items(step, ["config"])["config"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings`: a restore target."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def data_state_for_this_process(saved: dict, own: dict) -> dict:
  """Hosts read in lockstep (the same batch index on every host), so the state saved by the
  primary host restores every host once its own slice (process_index) is put back in."""
  saved_config = dict(saved.get("config", {}))
  own_config = own["config"]
  mismatch = {
    k: (saved_config.get(k), v)
    for k, v in own_config.items()
    if k != "process_index" and saved_config.get(k) != v
  }
  if mismatch:
    raise ValueError(
      f"the checkpoint's data state does not fit this run's data pipeline "
      f"(field: (saved, now)): {mismatch}"
    )
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
