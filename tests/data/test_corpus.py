"""A run's data: prepared once, reused only for the same settings, shards checked against
the config."""

import json
import os

import pytest

from data import corpus
from data.sources import DataError


def _text(tmp_path):
  path = tmp_path / "text.txt"
  path.write_text("To be, or not to be, that is the question.\n" * 200)
  return str(path)


def test_prepared_once_then_reused_and_stale_data_refused(tmp_path):
  cfg = corpus.DataConfig(corpus="text", path=_text(tmp_path), tokenizer="char")
  work = str(tmp_path / "run")
  tok, train_dir, _ = corpus.build(cfg, work, progress=False)
  stamp = os.path.join(work, "data", "data_config.json")
  assert json.load(open(stamp))["tokenizer"] == "char"
  mtime = os.path.getmtime(os.path.join(train_dir, "meta.json"))
  again, _, _ = corpus.build(cfg, work, progress=False)
  assert again.vocab_size == tok.vocab_size
  assert os.path.getmtime(os.path.join(train_dir, "meta.json")) == mtime, "must not re-prepare"
  with pytest.raises(DataError, match=r"add_eos.*new --workdir"):
    corpus.build(
      corpus.DataConfig(corpus="text", path=cfg.path, tokenizer="char", add_eos=False),
      work,
      progress=False,
    )


def test_unfinished_preparation_is_redone(tmp_path):
  cfg = corpus.DataConfig(corpus="text", path=_text(tmp_path), tokenizer="char")
  work = str(tmp_path / "run")
  _, train_dir, _ = corpus.build(cfg, work, progress=False)
  os.remove(os.path.join(work, "data", "data_config.json"))  # as if it died before the end
  meta = os.path.join(train_dir, "meta.json")
  os.utime(meta, (0, 0))
  stale = os.path.join(train_dir, "tokens-99999.bin")  # a shard the dead run left behind
  with open(stale, "wb") as f:
    f.write(b"\0" * 64)
  corpus.build(cfg, work, progress=False)
  assert os.path.exists(os.path.join(work, "data", "data_config.json"))
  assert os.path.getmtime(meta) > 0, "the split must be prepared again"
  assert not os.path.exists(stale), "a partial shard of the dead run must not be read"


def test_shards_must_match_the_configs_bos_eos(tmp_path):
  cfg = corpus.DataConfig(corpus="text", path=_text(tmp_path), tokenizer="char", add_bos=False)
  corpus.build(cfg, str(tmp_path / "prep"), progress=False)
  shards = str(tmp_path / "prep" / "data")
  ok = corpus.DataConfig(corpus="shards", path=shards, add_bos=False)
  corpus.build(ok, str(tmp_path / "run1"), progress=False)
  with pytest.raises(DataError, match=r"data.add_bos=True .* add_bos=False"):
    corpus.build(
      corpus.DataConfig(corpus="shards", path=shards), str(tmp_path / "run2"), progress=False
    )
