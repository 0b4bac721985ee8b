"""Orbax checkpoints of a stage's states and named JSON items; resume and restore onto any
mesh layout."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class CheckpointError(OSError):
  """A checkpoint that cannot be written or read; the message says which and what to do."""


class ConfigMismatch(ValueError):
  """A workdir's checkpoints were made by another config."""


# What a resumed run may change: how long and how it runs, where, and what it logs; not what
# it trains. Prefixes of dotted config fields.
FREE_TO_CHANGE = (
  "train.steps",
  "train.log_every",
  "train.eval_every",
  "train.eval_batches",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.async_checkpoints",
  "train.max_seconds",
  "train.peak_flops",
  "train.sample_",
  "train.tensorboard",
  "train.progress",
  "train.nonfinite",
  "train.allow_config_change",
  "mesh.",
  "distributed.",
  "data.worker_count",
)


def config_changes(saved: dict, now: dict) -> dict[str, tuple]:
  """{dotted field: (saved, now)} for the fields of two configs that differ, leaving out
  FREE_TO_CHANGE and fields only one of them has (added or removed since). train.steps sets
  the schedule's length when opt.total_steps is 0, and then counts as opt.total_steps."""

  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out

  a, b = (flat(json.loads(json.dumps(c, default=str))) for c in (saved, now))
  for c in (a, b):
    if c.get("opt.total_steps") == 0:
      c["opt.total_steps"] = c.get("train.steps")
  return {
    k: (a[k], b[k])
    for k in sorted(a.keys() & b.keys())
    if a[k] != b[k] and not k.startswith(FREE_TO_CHANGE)
  }


STATES = "states"  # the item holding the stage's pytree of TrainStates
CHECKSUMS = "checksums"  # fingerprint(states) at save time, checked by every restore
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
    self.async_save = async_save
    self._pending = None  # the step whose save may still be running in the background
    self.failed = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, states, items: dict[str, Any]) -> bool:
    """`states` is any pytree of arrays; `items` maps a name to a JSON-able value (None
    values are left out). A save that fails, now or in the background (a full disk), is a
    CheckpointError naming the step and the checkpoints still intact."""
    if STATES in items:
      raise ValueError(f"{STATES!r} names the states item; choose another JSON item name")
    args = {STATES: ocp.args.StandardSave(states)}
    items = {**items, CHECKSUMS: fingerprint(states)}
    args.update({k: ocp.args.JsonSave(v) for k, v in items.items() if v is not None})
    self.wait()  # orbax runs one save at a time; an error of the last one names its step
    with self._saving(step):
      saved = self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    self._pending = step if self.async_save else None
    return saved

  @contextlib.contextmanager
  def _saving(self, step):
    """Turns an error of this save, or of the one still in the background, into a
    CheckpointError naming both the step and the checkpoints on disk (left intact: orbax
    writes into a temporary directory and commits it only when complete)."""
    try:
      yield
    except (OSError, ValueError, RuntimeError) as e:
      self.failed = True
      kept = sorted(s for s in self.manager.all_steps() if os.path.isdir(self._path(s)))
      where = step if step is not None else self._pending
      raise CheckpointError(
        f"saving checkpoint step {where} in {self.directory} failed: {e}. "
        + (
          f"Checkpoints {kept} are intact; free space and run again to resume from step "
          f"{max(kept)}."
          if kept
          else "No earlier checkpoint exists."
        )
      ) from e

  def _path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_items(self, names: list[str]) -> dict[str, Any]:
    """The named JSON items of the newest checkpoint whose items can be read ({} when there
    is none): what a resume checks (the config) and keeps (the weights it started from)
    before anything is built."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore_items(step, names)
      except Exception:  # unreadable: restore_latest reports it
        continue
    return {}

  def restore_latest(self, abstract_states):
    """(step, states, JSON items) of the newest checkpoint that restores, or None when there
    is none.

    A checkpoint that cannot be read (truncated, corrupted) is moved aside to
    `unreadable-<step>` with a warning naming it and the step resumed instead; when none can
    be read, a CheckpointError names each failure and nothing is moved (never a silent fresh
    start)."""
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        states, items = self.restore(step, abstract_states)
      except Exception as e:  # orbax and tensorstore raise many kinds
        first = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore")[0][:200]
        failed.append((step, f"{type(e).__name__}: {first}"))
        continue
      for bad, why in failed:  # every process tried; the first moves them
        aside = os.path.join(self.directory, f"unreadable-{bad}")
        if jax.process_index() == 0:
          os.replace(self._path(bad), aside)
          print(
            f"WARNING: checkpoint step {bad} in {self.directory} cannot be read ({why}); "
            f"moved it to {aside} and resuming from step {step} instead"
          )
      if failed:
        self.manager.reload()
      return step, states, items
    if failed:
      raise CheckpointError(
        f"no checkpoint in {self.directory} can be read: "
        + "; ".join(f"step {s}: {why}" for s, why in failed)
        + ". Move the directory away to start afresh, or restore it from a copy."
      )
    return None

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
    if CHECKSUMS in names:
      saved, now = restored[CHECKSUMS], fingerprint(restored[STATES])
      wrong = [k for k in saved if saved[k] != now.get(k)]
      if wrong:
        raise CheckpointError(
          f"checkpoint step {step} in {self.directory}: the bits of {len(wrong)} of {len(saved)} arrays "
          f"({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}) differ from those saved"
        )
    return restored[STATES], {n: restored[n] for n in names if n not in (STATES, CHECKSUMS)}

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
    """Waits for the save running in the background, if any."""
    if self._pending is None:
      return
    with self._saving(None):
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    self._pending = None

  def close(self):
    try:
      if not self.failed:
        self.wait()
    finally:
      self.manager.close()


@jax.jit
def _fingerprints(tree):
  def one(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
      bits = x.astype(jnp.uint32)
    else:
      unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
      bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    odd = 2 * jax.lax.iota(jnp.uint32, max(x.size, 1))[: x.size].reshape(x.shape) + 1
    return jnp.sum(bits * odd, dtype=jnp.uint32)

  return jax.tree.map(one, tree)


def fingerprint(tree) -> dict[str, int]:
  """{path: checksum} of every array's bits: the sum of bits[i] * (2i + 1) over the flat
  logical index i, modulo 2^32. Integer sums do not depend on the order or the sharding, so a
  checkpoint restored onto another layout checks the same; flipping any one bit changes its
  array's checksum (2^k times an odd number is never 0 modulo 2^32)."""
  sums = jax.device_get(_fingerprints(tree))
  return {
    jax.tree_util.keystr(path): int(v) for path, v in jax.tree_util.tree_leaves_with_path(sums)
  }


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
