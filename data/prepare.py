"""Tokenize a corpus once into token shards on disk (the format the pipeline memory-maps)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator

import numpy as np
import tqdm

from data import sources
from data.sources import DataError
from data.tokenizer import CharTokenizer, Tokenizer, load_tokenizer, train_sentencepiece

FORMAT = "fromscratch-token-shards-v1"
META_FILE = "meta.json"
DOC_STARTS_FILE = "doc_starts.bin"
TOKENIZER_DIR = "tokenizer"

DEBUG_ENV = "FROMSCRATCH_DEBUG"  # set, an error shows its traceback (as in train/cli.py)


class OneLineParser(argparse.ArgumentParser):
  """argparse for the data tools: errors in one line, not the usage block (--help shows it)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")

  def fail(self, e: BaseException, debug: bool) -> None:
    """Ends on a user error (a DataError names its file and line): one line and status 1, or
    130 for Ctrl-C; re-raises under --debug or FROMSCRATCH_DEBUG."""
    if debug or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no"):
      raise e
    if isinstance(e, KeyboardInterrupt):
      self.exit(130)
    self.exit(1, f"{self.prog}: error: {' '.join(str(e).split())}\n")


def _shard_name(k: int) -> str:
  return f"tokens-{k:05d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


class _ShardWriter:
  """Appends tokens to fixed-size shard files, so global position p lives in shard p // shard_tokens."""

  def __init__(self, out_dir: str, dtype: np.dtype, shard_tokens: int):
    self.out_dir, self.dtype, self.shard_tokens = out_dir, dtype, shard_tokens
    self.num_tokens = 0
    self.num_shards = 0
    self._file = None
    self._starts = open(os.path.join(out_dir, DOC_STARTS_FILE), "wb")

  def add_document(self, ids_T: np.ndarray) -> None:
    self._write(np.array([self.num_tokens], dtype=np.int64), self._starts)
    while len(ids_T):
      if self._file is None or self.num_tokens % self.shard_tokens == 0:
        if self._file is not None:
          self._file.close()
        self._file = open(os.path.join(self.out_dir, _shard_name(self.num_shards)), "wb")
        self.num_shards += 1
      room = self.shard_tokens - self.num_tokens % self.shard_tokens
      self._write(ids_T[:room].astype(self.dtype), self._file)
      self.num_tokens += min(room, len(ids_T))
      ids_T = ids_T[room:]

  @staticmethod
  def _write(array: np.ndarray, file) -> None:
    try:
      array.tofile(file)
    except OSError as e:  # numpy's message names no file: "N requested and M written"
      raise OSError(f"writing {file.name} failed: {e} (is the disk full?)") from e

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    self._starts.close()


def _chunks(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
  """Groups documents so the tokenizer encodes a batch at once without holding the corpus."""
  chunk, size = [], 0
  for doc in documents:
    chunk.append(doc)
    size += len(doc)
    if size >= max_chars:
      yield chunk
      chunk, size = [], 0
  if chunk:
    yield chunk


def prepare(
  documents: Iterable[str],
  tokenizer: Tokenizer,
  out_dir: str | os.PathLike,
  *,
  shard_tokens: int = 2**26,
  add_bos: bool = True,
  add_eos: bool = True,
  chunk_chars: int = 1 << 22,
  progress: bool = True,
) -> dict:
  """Tokenizes `documents` (streamed) into `out_dir`; returns and prints a summary.

  Each document is stored as [bos] + tokens + [eos]; empty documents are skipped and counted.
  The tokenizer is saved alongside (out_dir/tokenizer) so the shards can always be decoded.
  """
  out_dir = str(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  for name in os.listdir(out_dir):  # a re-run must not leave stale shards behind
    if name.startswith("tokens-") and name.endswith(".bin"):
      os.remove(os.path.join(out_dir, name))
  dtype = token_dtype(tokenizer.vocab_size)
  writer = _ShardWriter(out_dir, dtype, shard_tokens)
  num_docs = skipped = num_bytes = 0
  start = time.perf_counter()
  bar = tqdm.tqdm(desc=f"prepare {os.path.basename(out_dir)}", unit="doc", disable=not progress)
  try:
    for chunk in _chunks(documents, chunk_chars):
      texts = [d for d in chunk if d]
      skipped += len(chunk) - len(texts)
      num_bytes += sum(len(d.encode("utf-8")) for d in texts)
      for ids in tokenizer.encode_batch(texts, bos=add_bos, eos=add_eos):
        writer.add_document(np.asarray(ids, dtype=np.int64))
      num_docs += len(texts)
      bar.update(len(chunk))
      bar.set_postfix(tokens=writer.num_tokens)
  finally:
    bar.close()
    writer.close()
  if writer.num_tokens == 0:
    raise DataError(f"empty corpus for {out_dir}: {num_docs} non-empty documents, {skipped} empty")
  seconds = time.perf_counter() - start
  tokenizer.save(os.path.join(out_dir, TOKENIZER_DIR))
  meta = {
    "format": FORMAT,
    "dtype": dtype.name,
    "num_tokens": writer.num_tokens,
    "num_documents": num_docs,
    "num_shards": writer.num_shards,
    "shard_tokens": shard_tokens,
    "skipped_empty": skipped,
    "bytes": num_bytes,
    "tokenizer_kind": tokenizer.kind,
    "vocab_size": tokenizer.vocab_size,
    "bos_id": tokenizer.bos_id,
    "eos_id": tokenizer.eos_id,
    "pad_id": tokenizer.pad_id,
    "add_bos": add_bos,
    "add_eos": add_eos,
  }
  with open(os.path.join(out_dir, META_FILE), "w") as f:
    json.dump(meta, f, indent=1)
  summary = dict(meta, seconds=seconds, mb_per_s=num_bytes / 1e6 / max(seconds, 1e-9))
  if progress:
    print(
      f"{out_dir}: {num_docs} documents, {writer.num_tokens} tokens ({dtype.name}), "
      f"{writer.num_shards} shards, {skipped} empty skipped, {summary['mb_per_s']:.1f} MB/s"
    )
  return summary


class TokenShards:
  """Read side of the format: memory-mapped shards viewed as one token stream plus document starts."""

  def __init__(self, shard_dir: str | os.PathLike):
    self.dir = str(shard_dir)
    path = os.path.join(self.dir, META_FILE)
    if not os.path.exists(path):
      raise DataError(
        f"{self.dir} holds no token shards ({META_FILE} missing); run python -m data.prepare"
      )
    with open(path) as f:
      self.meta = json.load(f)
    if self.meta.get("format") != FORMAT:
      raise DataError(f"{path}: unknown shard format {self.meta.get('format')!r}")
    self.num_tokens = self.meta["num_tokens"]
    self.shard_tokens = self.meta["shard_tokens"]
    self._maps: list[np.ndarray] | None = None
    self._doc_starts: np.ndarray | None = None

  def __getstate__(self):
    # Worker processes reopen the memmaps instead of pickling their contents.
    return {k: (None if k in ("_maps", "_doc_starts") else v) for k, v in self.__dict__.items()}

  @property
  def doc_starts(self) -> np.ndarray:
    if self._doc_starts is None:
      self._doc_starts = np.fromfile(os.path.join(self.dir, DOC_STARTS_FILE), dtype=np.int64)
    return self._doc_starts

  @property
  def maps(self) -> list[np.ndarray]:
    if self._maps is None:
      dtype = np.dtype(self.meta["dtype"])
      self._maps = [
        np.memmap(os.path.join(self.dir, _shard_name(k)), dtype=dtype, mode="r")
        for k in range(self.meta["num_shards"])
      ]
    return self._maps

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the stream (stop clipped to the end), across shard files."""
    stop = min(stop, self.num_tokens)
    parts, pos = [], start
    while pos < stop:
      k, off = divmod(pos, self.shard_tokens)
      take = min(stop - pos, self.shard_tokens - off)
      parts.append(self.maps[k][off : off + take])
      pos += take
    return (
      parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.int64)
    )

  def tokenizer(self) -> Tokenizer:
    return load_tokenizer(os.path.join(self.dir, TOKENIZER_DIR))


def _documents(source: str, split: str, text_field: str) -> Iterator[str]:
  if source == "builtin":
    return sources.builtin_corpus(split)
  if source == "tinyshakespeare":
    return iter([sources.tinyshakespeare(split)])
  if split != "train":
    return iter(())
  if source.endswith(sources.JSONL_SUFFIXES):
    return sources.read_jsonl_text(source, field=text_field)
  return sources.read_text_files(source)


def main(argv: list[str] | None = None) -> None:
  p = OneLineParser(prog="python -m data.prepare", description=__doc__)
  p.add_argument(
    "--source",
    default="builtin",
    help="'builtin' (plays, split by play), 'tinyshakespeare' (90/10 chars), or a text/jsonl path or glob",
  )
  p.add_argument(
    "--val_source", default=None, help="text/jsonl path or glob for validation (file sources)"
  )
  p.add_argument("--text_field", default="text", help="JSONL field holding the document text")
  p.add_argument(
    "--tokenizer",
    default="bpe",
    help="a saved tokenizer directory, or 'bpe' / 'unigram' / 'char' to train on the train split",
  )
  p.add_argument(
    "--vocab_size", type=int, default=4096, help="vocabulary size when training sentencepiece"
  )
  p.add_argument("--shard_tokens", type=int, default=2**26, help="tokens per shard file")
  p.add_argument(
    "--add_bos",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="bos before each document",
  )
  p.add_argument(
    "--add_eos", action=argparse.BooleanOptionalAction, default=True, help="eos after each document"
  )
  p.add_argument(
    "--out", required=True, help="output directory: writes train/, val/ and tokenizer/"
  )
  p.add_argument(
    "--debug", action="store_true", help=f"show an error's traceback (or set {DEBUG_ENV}=1)"
  )
  args = p.parse_args(argv)
  try:
    _prepare(args)
  except (ValueError, OSError, KeyboardInterrupt) as e:  # DataError: names the file and line
    p.fail(e, args.debug)


def _prepare(args) -> None:
  def docs(split):
    if split == "val" and args.val_source:
      return _documents(args.val_source, "train", args.text_field)
    return _documents(args.source, split, args.text_field)

  if os.path.isdir(args.tokenizer):
    tok = load_tokenizer(args.tokenizer)
  elif args.tokenizer == "char":
    # Like nanoGPT shakespeare_char: the vocabulary covers train and val characters.
    tok = CharTokenizer.from_text(itertools.chain(docs("train"), docs("val")))
  elif args.tokenizer in ("bpe", "unigram"):
    tok = train_sentencepiece(docs("train"), vocab_size=args.vocab_size, model_type=args.tokenizer)
  else:
    raise DataError(f"--tokenizer must be a directory or bpe/unigram/char, got {args.tokenizer!r}")
  tok.save(os.path.join(args.out, TOKENIZER_DIR))
  for split in ("train", "val"):
    documents = docs(split)
    first = next(documents, None)
    if first is None:
      print(f"{split}: no documents, skipped")
      continue
    prepare(
      _chain(first, documents),
      tok,
      os.path.join(args.out, split),
      shard_tokens=args.shard_tokens,
      add_bos=args.add_bos,
      add_eos=args.add_eos,
    )


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
  yield first
  yield from rest


if __name__ == "__main__":
  main()
