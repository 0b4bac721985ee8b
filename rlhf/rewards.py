"""Rewards for RL: a programmatic function named in the config, or a reward model checkpoint."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any


class RewardError(ValueError):
  """A reward function that cannot be loaded or that returned something unusable."""


def is_function(spec: str) -> bool:
  """'module:function' names a programmatic reward; anything else is a reward-model workdir."""
  return ":" in spec and not spec.startswith(("/", ".")) and "/" not in spec.split(":")[0]


def load_function(spec: str) -> Callable:
  """The function that `module:function` names."""
  module_name, _, name = spec.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise RewardError(f"rlhf.reward={spec!r}: cannot import module {module_name!r} ({e})") from None
  fn = getattr(module, name, None)
  if not callable(fn):
    raise RewardError(f"rlhf.reward={spec!r}: module {module_name!r} has no function {name!r}")
  return fn


def call(fn: Callable, spec: str, records: Sequence[dict[str, Any]], completions: Sequence[str]):
  """fn(records, completions) -> one float per completion, checked: a function that raises,
  returns another count, a non-number, a NaN or an infinity gets an error naming it and the
  prompt record at fault."""
  try:
    out = fn(list(records), list(completions))
  except Exception as e:
    raise RewardError(
      f"reward function {spec} raised {type(e).__name__}: {e} (on a batch whose first prompt "
      f"record is {_show(records[0])})"
    ) from e
  try:
    scores = [float(x) for x in out]
  except (TypeError, ValueError):
    raise RewardError(
      f"reward function {spec} must return one float per completion, got {_show(out)}"
    ) from None
  if len(scores) != len(completions):
    raise RewardError(
      f"reward function {spec} returned {len(scores)} scores for {len(completions)} completions"
    )
  for i, s in enumerate(scores):
    if not math.isfinite(s):
      raise RewardError(
        f"reward function {spec} returned {s} for completion {i} {completions[i]!r} of prompt "
        f"record {_show(records[i])}"
      )
  return scores


def _show(value, limit: int = 160) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."
