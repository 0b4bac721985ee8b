"""Grain pipelines: packed pretraining rows from token shards, sharded by host, resumable exactly."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np
from absl import flags

from data.prepare import TokenShards
from data.sources import DataError

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only here: tests and tools may build batches without touching JAX

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} must be in [0, {process_count})")
  return process_index, process_count


def pack_rows(
  shards: TokenShards, rows_B: np.ndarray, seq_len: int, pad_id: int, stride: int | None = None
) -> Batch:
  """Row r is stream[r*S : r*S + L+1] with stride S (default L+1: rows do not overlap; a
  smaller S makes overlapping windows, S=1 every offset, as nanoGPT samples); rows past the
  end (or r < 0) come back as padding.

  Segment ids number the document pieces of a row from 1 and positions restart at every
  document start and every row start, so attention and RoPE never see another document;
  loss_mask is 1 only where input and target belong to the same document.
  """
  L1 = seq_len + 1
  stride = L1 if stride is None else stride
  rows_B = np.asarray(rows_B, dtype=np.int64)
  tokens_BxL1 = np.full((len(rows_B), L1), pad_id, dtype=np.int32)
  for b, r in enumerate(rows_B):
    if r >= 0:
      piece = shards.read(int(r) * stride, int(r) * stride + L1)
      tokens_BxL1[b, : len(piece)] = piece
  pos_BxL1 = rows_B[:, None] * stride + np.arange(L1)
  valid_BxL1 = (rows_B[:, None] >= 0) & (pos_BxL1 < shards.num_tokens)
  starts = shards.doc_starts
  doc_BxL1 = np.searchsorted(starts, pos_BxL1, side="right") - 1
  segment_BxL1 = np.where(valid_BxL1, doc_BxL1 - doc_BxL1[:, :1] + 1, 0)
  row_start_Bx1 = pos_BxL1[:, :1]
  positions_BxL1 = np.where(valid_BxL1, pos_BxL1 - np.maximum(starts[doc_BxL1], row_start_Bx1), 0)
  same_doc_BxL = (doc_BxL1[:, :-1] == doc_BxL1[:, 1:]) & valid_BxL1[:, 1:]
  return {
    "inputs": tokens_BxL1[:, :-1],
    "targets": tokens_BxL1[:, 1:],
    "segment_ids": segment_BxL1[:, :-1].astype(np.int32),
    "positions": positions_BxL1[:, :-1].astype(np.int32),
    "loss_mask": same_doc_BxL.astype(np.float32),
  }


_FMIX1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_SHIFT = np.uint64(33)
FEISTEL_ROUNDS = 6


def _fmix64(x: np.ndarray) -> np.ndarray:
  """MurmurHash3's 64-bit finaliser: every input bit flips about half the output bits."""
  x = x ^ (x >> _SHIFT)
  x = x * _FMIX1
  x = x ^ (x >> _SHIFT)
  x = x * _FMIX2
  return x ^ (x >> _SHIFT)


def permute(indices: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
  """A keyed pseudo-random bijection of [0, n), evaluated only at `indices`.

  A balanced Feistel network over the smallest even number of bits that covers n, with
  fmix64 of (half ^ round key) as the round function, then cycle-walking: values that land
  at or past n go through the network again until they fall inside, which keeps the map a
  bijection of [0, n). It costs O(len(indices)) time and no memory per row, so an epoch of
  any size is shuffled without materialising a permutation. grain's index_shuffle (4
  rounds) was measured to leave a 0.43 correlation between consecutive rows, so batches
  drew from nearby text; this map shows none (tests/data/test_pipeline.py).
  """
  half = np.uint64(max(1, ((n - 1).bit_length() + 1) // 2))
  mask = (np.uint64(1) << half) - np.uint64(1)

  def network(x: np.ndarray) -> np.ndarray:
    left, right = x >> half, x & mask
    for key in keys:
      left, right = right, left ^ (_fmix64(right ^ key) & mask)
    return (left << half) | right

  out = network(np.asarray(indices, dtype=np.uint64))
  outside = out >= np.uint64(n)
  while outside.any():  # the network's domain is < 4n, so few values walk, and not far
    out[outside] = network(out[outside])
    outside = out >= np.uint64(n)
  return out.astype(np.int64)


@functools.lru_cache(maxsize=16)
def epoch_keys(seed: int, epoch: int) -> np.ndarray:
  """The Feistel round keys of one epoch (read-only: the cache hands out one array)."""
  if seed < 0:
    raise DataError(f"the shuffling seed (data.seed) must be >= 0, got {seed}")
  keys = np.random.SeedSequence([seed, epoch]).generate_state(FEISTEL_ROUNDS, np.uint64)
  keys.flags.writeable = False
  return keys


_CHUNK = 1024


class _Shuffle(grain.MapDataset):
  """A global shuffle of the parent, a different permutation (`permute`) each epoch."""

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed = seed
    self._cache: tuple[int, list[int]] = (-1, [])

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"Shuffle(seed={self._seed})"

  def _shuffled(self, indices) -> list[int]:
    n = len(self._parent)
    epochs, within = np.divmod(np.asarray(indices, dtype=np.int64), n)
    out = np.empty_like(within)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = permute(within[sel], n, epoch_keys(self._seed, int(epoch))) + epoch * n
    return out.tolist()

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    # grain reads a batch one index at a time, in order: map a whole chunk at once. Its
    # reader threads share this object, so the cache is one tuple, read and replaced whole.
    start = index - index % _CHUNK
    cached_start, chunk = self._cache
    if cached_start != start:
      chunk = self._shuffled(range(start, start + _CHUNK))
      self._cache = (start, chunk)
    return self._parent[chunk[index - start]]

  def _getitems(self, indices):
    return self._parent._getitems(self._shuffled(indices))  # pylint: disable=protected-access


class _PackRows:
  """Picklable batch maker so grain worker processes can run it."""

  def __init__(self, shards: TokenShards, seq_len: int, stride: int):
    self.shards, self.seq_len, self.pad_id = shards, seq_len, shards.meta["pad_id"]
    self.stride = stride

  def __call__(self, rows_B: np.ndarray) -> Batch:
    return pack_rows(self.shards, rows_B, self.seq_len, self.pad_id, self.stride)


class BatchIterator:
  """A resumable batch iterator over a grain pipeline.

  `get_state()` returns a JSON-serialisable dict: the grain iterator state under "grain"
  (for worker_count=0 just the next batch index) and the pipeline's settings under "config";
  `set_state()` refuses a state saved with other settings (another seed, length or host).
  After `set_state(s)` the iterator yields exactly the batches that followed when s was saved.
  """

  def __init__(
    self,
    dataset: grain.MapDataset,
    config: dict[str, Any],
    *,
    worker_count: int,
    steps_per_epoch: int,
  ):
    self.config = config
    self.steps_per_epoch = steps_per_epoch
    # Batches are built vectorised in one call, so a couple of reader threads suffice.
    it_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if worker_count > 0:
      # grain reads its settings from absl flags; the program parses them, not the data code.
      if not flags.FLAGS.is_parsed():
        raise DataError(
          f"data.worker_count={worker_count} starts grain worker processes, which read absl "
          "flags, but none were parsed: run under absl.app.run, or call "
          "absl.flags.FLAGS(sys.argv[:1]) first (as train.main and tests/conftest.py do)"
        )
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    self._it = iter(it_ds)

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> Batch:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._it.get_state(), "config": dict(self.config)}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("config") != self.config:
      raise DataError(
        f"data state was saved with {state.get('config')}, this pipeline is {self.config}"
      )
    self._it.set_state(state["grain"])

  def close(self) -> None:
    if hasattr(self._it, "close"):
      self._it.close()


def shuffled_batches(
  num_rows: int,
  make_batch: Callable[[np.ndarray], Batch],
  *,
  batch_size: int,
  seed: int,
  process_index: int | None,
  process_count: int | None,
  worker_count: int = 0,
  num_epochs: int | None = None,
  shuffle: bool = True,
  config: dict[str, Any] | None = None,
) -> BatchIterator:
  """Rows 0..num_rows-1 → per-epoch seeded shuffle → global batches → this host's block → epochs.

  A global batch is batch_size * process_count consecutive shuffled rows and host p reads
  block p of it, so the hosts' batches concatenated in host order are exactly the batch one
  process would read (what jax.make_array_from_process_local_data assembles when host p's
  devices hold rows p*batch_size onward). Every host gets the same number of batches per
  epoch, so multi-host steps stay in lockstep; a partial last global batch is dropped.
  """
  p, n_proc = _process(process_index, process_count)
  steps = num_rows // (batch_size * n_proc)
  if steps == 0:
    raise DataError(
      f"{num_rows} rows cannot fill one batch of {batch_size} on each of {n_proc} hosts"
    )
  ds = grain.MapDataset.range(num_rows)
  if shuffle:  # a new permutation each epoch, derived from (seed, epoch)
    ds = _Shuffle(ds, seed)
  ds = (
    ds[: steps * batch_size * n_proc]
    .batch(batch_size, drop_remainder=True)[p::n_proc]
    .map(make_batch)
  )
  steps = len(ds)
  ds = ds.repeat(num_epochs)
  # worker_count changes the saved state's format (grain saves per-worker states).
  # `shuffle` names the permutation, so a state saved under another order is refused.
  config = dict(
    config or {},
    num_rows=num_rows,
    batch_size=batch_size,
    seed=seed,
    shuffle=f"feistel{FEISTEL_ROUNDS}-fmix64" if shuffle else False,
    worker_count=worker_count,
    process_index=p,
    process_count=n_proc,
  )
  return BatchIterator(ds, config, worker_count=worker_count, steps_per_epoch=steps)


def pretrain_iterator(
  shard_dir: str | os.PathLike,
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int = 0,
  num_epochs: int | None = None,
  window_stride: int = 0,
) -> BatchIterator:
  """Packed pretraining batches (keys BATCH_KEYS, each (batch_size, seq_len)) from prepared shards.

  Args:
    shard_dir: a directory written by data.prepare.prepare.
    process_index, process_count: this host's slice; default jax.process_index()/process_count().
    worker_count: grain worker processes prefetching batches (0: in this process).
    num_epochs: None repeats forever; each epoch is reshuffled.
    window_stride: tokens between row starts; 0 means seq_len + 1 (rows do not overlap),
      1 makes every offset a row (nanoGPT's random windows, without replacement per epoch).
  """
  shards = TokenShards(shard_dir)
  stride = window_stride or seq_len + 1
  if not 0 < stride <= seq_len + 1:
    raise DataError(
      f"window_stride must be in [1, seq_len + 1 = {seq_len + 1}], got {window_stride}"
    )
  num_rows = max(shards.num_tokens - (seq_len + 1), -1) // stride + 1
  if num_rows == 0:
    raise DataError(
      f"{shard_dir}: {shards.num_tokens} tokens are fewer than one row of {seq_len + 1}"
    )
  return shuffled_batches(
    num_rows,
    _PackRows(shards, seq_len, stride),
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    worker_count=worker_count,
    num_epochs=num_epochs,
    config={"kind": "pretrain", "seq_len": seq_len, "window_stride": stride},
  )


def eval_batches(
  shard_dir: str | os.PathLike,
  *,
  seq_len: int,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """Every row of a split once, in order (the tail as a partial row); the last batch is padded.

  Padding rows have segment_ids 0 and loss_mask 0, so summed losses over the batches are exact.
  With several hosts, global batch k is rows k*G..(k+1)*G-1 (G = batch_size * process_count)
  and host p takes block p of it, as in shuffled_batches; all hosts yield the same number of
  batches.
  """
  shards = TokenShards(shard_dir)
  num_rows = math.ceil(shards.num_tokens / (seq_len + 1))
  global_batch = batch_size * process_count
  pad_id = shards.meta["pad_id"]
  for k in range(math.ceil(num_rows / global_batch)):
    rows = k * global_batch + process_index * batch_size + np.arange(batch_size)
    yield pack_rows(shards, np.where(rows < num_rows, rows, -1), seq_len, pad_id)
