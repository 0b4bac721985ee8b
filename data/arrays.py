"""Rows held in memory (packed chats, preference pairs, prompts, labelled texts): shuffled,
host-sharded, resumable training batches; every row once, padded, for evaluation; and the
seeded held-out split."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from data.pipeline import Batch, BatchIterator, shuffled_batches
from data.sources import DataError


class _TakeRows:
  """Picklable batch maker over in-memory arrays."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def __call__(self, rows_B: np.ndarray) -> Batch:
    return {k: v[rows_B] for k, v in self.arrays.items()}


def array_iterator(
  arrays: dict[str, np.ndarray],
  stats: dict[str, int],
  *,
  kind: str,
  batch_size: int,
  seed: int,
  shuffle: bool = True,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int = 0,
  num_epochs: int | None = None,
) -> BatchIterator:
  """Shuffled, host-sharded, resumable batches over rows of in-memory arrays (stats on `.stats`)."""
  num_rows = len(next(iter(arrays.values())))
  it = shuffled_batches(
    num_rows,
    _TakeRows(arrays),
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    worker_count=worker_count,
    num_epochs=num_epochs,
    shuffle=shuffle,
    config={"kind": kind, **stats},
  )
  it.stats = stats
  return it


def split_held_out(examples: Sequence, fraction: float, seed: int) -> tuple[list, list]:
  """(train, held out): a seeded random `fraction` of the examples held out, the rest in
  their order. At least one example is held out when fraction > 0."""
  if not 0.0 <= fraction < 1.0:
    raise DataError(f"the held-out fraction must be in [0, 1), got {fraction}")
  n = len(examples)
  k = max(1, round(n * fraction)) if fraction > 0 else 0
  if k >= n:
    raise DataError(f"holding out {k} of {n} examples leaves none to train on")
  held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
  train = [e for i, e in enumerate(examples) if i not in held]
  return train, [examples[i] for i in sorted(held)]


def padded_batches(
  arrays: dict[str, np.ndarray], batch_size: int, *, block: int = 0, blocks: int = 1
) -> Iterable[Batch]:
  """Every row in order, in global batches of `batch_size` (this process's `block` of each);
  the last batch is filled with zero rows, which carry no loss (evaluation sees each row
  once)."""
  num_rows = len(next(iter(arrays.values())))
  per = batch_size // blocks
  for start in range(0, num_rows, batch_size):
    batch = {}
    for k, v in arrays.items():
      rows = v[start : start + batch_size]
      if len(rows) < batch_size:
        pad = np.zeros((batch_size - len(rows),) + v.shape[1:], v.dtype)
        rows = np.concatenate([rows, pad])
      batch[k] = rows[block * per : (block + 1) * per]
    yield batch
