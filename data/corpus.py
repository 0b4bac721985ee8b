"""A run's data: its tokenizer and token shards, built once into the workdir from the config."""

from __future__ import annotations

import dataclasses
import json
import os

from data import sources
from data.prepare import META_FILE, prepare
from data.sources import DataError
from data.tokenizer import CharTokenizer, Tokenizer, load_tokenizer, train_sentencepiece

CORPORA = ("shakespeare", "text", "shards")
TOKENIZERS = ("bpe", "unigram", "char")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What a run reads; the meaning of each field is in configs/base.py."""

  corpus: str = "shakespeare"
  path: str = ""
  tokenizer: str = "bpe"
  vocab_size: int = 2048
  seq_len: int = 128
  batch_size: int = 16
  eval_batch_size: int = 32
  add_bos: bool = True
  add_eos: bool = True
  seed: int = 0
  worker_count: int = 0
  window_stride: int = 0

  def __post_init__(self):
    if self.corpus not in CORPORA:
      raise DataError(f"data.corpus={self.corpus!r} is unknown; choose one of {', '.join(CORPORA)}")
    if self.tokenizer not in TOKENIZERS:
      raise DataError(
        f"data.tokenizer={self.tokenizer!r} is unknown; choose one of {', '.join(TOKENIZERS)}"
      )
    if self.corpus == "shards" and not self.path:
      raise DataError(
        "data.corpus='shards' needs data.path: a directory written by "
        "`python -m data.prepare --out DIR` (with train/, val/ and tokenizer/)"
      )
    for name in ("seq_len", "batch_size", "eval_batch_size", "vocab_size"):
      if getattr(self, name) <= 0:
        raise DataError(f"data.{name} must be > 0, got {getattr(self, name)}")


def _documents(cfg: DataConfig, split: str):
  if cfg.corpus == "shakespeare":
    return sources.builtin_corpus(split)
  return [sources.tinyshakespeare(split, cfg.path or None)]


def build(cfg: DataConfig, workdir: str, *, progress: bool = True) -> tuple[Tokenizer, str, str]:
  """Returns (tokenizer, train shard dir, val shard dir), preparing them on first use.

  The tokenizer is saved in workdir/tokenizer so every checkpoint of the run can be decoded.
  """
  tok_dir = os.path.join(workdir, "tokenizer")
  if cfg.corpus == "shards":
    train_dir, val_dir = os.path.join(cfg.path, "train"), os.path.join(cfg.path, "val")
    for d in (train_dir, val_dir):
      if not os.path.exists(os.path.join(d, META_FILE)):
        raise DataError(
          f"{d} holds no prepared shards ({META_FILE} missing); run "
          f"`python -m data.prepare --out {cfg.path}` first"
        )
      with open(os.path.join(d, META_FILE)) as f:
        meta = json.load(f)
      # Sampling and evaluation follow the config; it must describe the shards as written.
      for field in ("add_bos", "add_eos"):
        if meta.get(field) != getattr(cfg, field):
          raise DataError(
            f"data.{field}={getattr(cfg, field)} but {d} was prepared with "
            f"{field}={meta.get(field)}; set --config.data.{field}="
            f"{meta.get(field)}"
          )
    tokenizer = load_tokenizer(os.path.join(train_dir, "tokenizer"))  # prepare saves it there
    tokenizer.save(tok_dir)
    return tokenizer, train_dir, val_dir

  data_dir = os.path.join(workdir, "data")
  train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
  stamp_path = os.path.join(data_dir, "data_config.json")
  # What the prepared data depends on; batch sizes, seeds and lengths are read-time choices.
  stamp = {
    k: getattr(cfg, k) for k in ("corpus", "path", "tokenizer", "vocab_size", "add_bos", "add_eos")
  }
  if os.path.exists(stamp_path):
    with open(stamp_path) as f:
      old = json.load(f)
    if old != stamp:
      changed = {k: (old.get(k), v) for k, v in stamp.items() if old.get(k) != v}
      raise DataError(
        f"{data_dir} was prepared for other data settings (field: (then, now)) "
        f"{changed}; use a new --workdir, or delete {data_dir} and "
        f"{tok_dir} to prepare again"
      )
    if os.path.isdir(tok_dir):
      return load_tokenizer(tok_dir), train_dir, val_dir

  if cfg.tokenizer == "char":
    # nanoGPT builds the character set from the whole text, so ids match its meta.pkl.
    tokenizer = CharTokenizer.from_text(
      list(_documents(cfg, "train")) + list(_documents(cfg, "val"))
    )
  else:
    tokenizer = train_sentencepiece(
      _documents(cfg, "train"), vocab_size=cfg.vocab_size, model_type=cfg.tokenizer
    )
  tokenizer.save(tok_dir)
  for split, out in (("train", train_dir), ("val", val_dir)):
    prepare(
      _documents(cfg, split),
      tokenizer,
      out,
      add_bos=cfg.add_bos,
      add_eos=cfg.add_eos,
      progress=progress,
    )
  # Written last: a preparation that died midway is never mistaken for finished data.
  with open(stamp_path, "w") as f:
    json.dump(stamp, f, indent=1)
  return tokenizer, train_dir, val_dir
