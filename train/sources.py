"""Which weights a run read, pinned for its resume: each setting that names a workdir
(train.init_from, rlhf.reward, rlhf.critic_from, rlhf.norm_policy) is recorded as an absolute
path and a step when the run first starts (checkpoint item 'sources'), and a resumed run reads
exactly those weights again, not a later step of the run they came from."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Any

from model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a model's weights come from: a run's checkpoint or a Hugging Face folder."""

  format: str  # 'workdir' | 'hf'
  path: str
  step: int | None  # the checkpoint's step (workdir)
  state: str  # the state within the checkpoint that holds the model (workdir)
  kind: str  # 'lm' | 'scalar'
  model_cfg: ModelConfig
  config: dict  # the run's config (workdir) or config.json (hf)
  tokenizer: Any = None  # the run's tokenizer; a Hugging Face folder's tokenizer.json, if any
  items: dict = dataclasses.field(default_factory=dict)  # the checkpoint's JSON items
  field: str = "train.init_from"  # the setting that named it
  given: str = ""  # the path as that setting gave it

  def ref(self) -> dict:
    """What a checkpoint records of where its weights came from: enough to read exactly
    these weights again (an absolute path and a step, not 'the latest')."""
    return {
      "format": self.format,
      "given": self.given,
      "path": os.path.abspath(self.path),
      "step": self.step,
      "state": self.state,
    }

  def describe(self) -> str:
    if self.format == "hf":
      return f"Hugging Face folder {self.path}"
    return f"{self.path} step {self.step} ({self.state})"


# (saved: field -> ref, record: field -> ref) while a stage is built; None outside `pinned`.
_PINS: contextvars.ContextVar = contextvars.ContextVar("weight_pins", default=None)


@contextlib.contextmanager
def pinned(saved: dict | None):
  """Within: each setting that names a workdir and asks for its latest step reads the step
  that `saved` (a checkpoint's 'sources' item: field -> Source.ref()) recorded for it, so a
  resumed run reads the weights its first start read even when that workdir has trained on
  since. Yields the dict that records each resolution, to be saved as the next 'sources'."""
  record: dict = {}
  token = _PINS.set((dict(saved or {}), record))
  try:
    yield record
  finally:
    _PINS.reset(token)


def pin(path: str, step: int, state: str, field: str) -> dict | None:
  """The recorded ref to read when this run read `field` before from the same setting."""
  pins = _PINS.get()
  ref = pins[0].get(field) if pins else None
  if not ref or ref.get("format") != "workdir" or ref.get("given") != path:
    return None
  if step not in (0, ref["step"]) or state not in ("", ref["state"]):
    return None
  return ref


def record(field: str, ref: dict) -> None:
  """Note that `field` read the weights at `ref` (inside `pinned`; a no-op outside)."""
  pins = _PINS.get()
  if pins is not None:
    pins[1][field] = ref
