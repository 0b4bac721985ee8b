"""prepare: shards hold exactly [bos] + tokens + [eos] per document, in order, with boundaries."""

import json

import numpy as np
import pytest

from data import prepare as prep
from data.sources import DataError
from data.tokenizer import CharTokenizer
from tests.full_disk import full_disk

DOCS = ["to be or not", "", "that is the question", "a", "whether tis nobler in the mind to suffer"]


def test_shards_hold_the_token_stream_and_boundaries(tmp_path):
  tok = CharTokenizer.from_text("".join(DOCS))
  summary = prep.prepare(
    iter(DOCS), tok, tmp_path / "s", shard_tokens=7, chunk_chars=10, progress=False
  )
  expected, starts = [], []
  for d in DOCS:
    if d:
      starts.append(len(expected))
      expected += [tok.bos_id] + [tok.chars.index(c) for c in d] + [tok.eos_id]
  shards = prep.TokenShards(tmp_path / "s")
  assert shards.read(0, 10**9).tolist() == expected
  assert shards.read(5, 19).tolist() == expected[5:19], "reads across shard files"
  assert shards.doc_starts.tolist() == starts
  assert summary["num_documents"] == 4 and summary["skipped_empty"] == 1
  assert summary["num_tokens"] == len(expected)
  assert summary["num_shards"] == -(-len(expected) // 7)
  assert shards.meta["dtype"] == "uint16"
  assert shards.tokenizer().encode("to be") == tok.encode("to be")


def test_bos_eos_are_configurable(tmp_path):
  tok = CharTokenizer.from_text("abc")
  prep.prepare(["ab", "c"], tok, tmp_path, add_bos=False, add_eos=True, progress=False)
  assert prep.TokenShards(tmp_path).read(0, 100).tolist() == [0, 1, tok.eos_id, 2, tok.eos_id]


def test_a_full_disk_names_the_shard(tmp_path):
  """Files may not grow past 64 kB (RLIMIT_FSIZE, as a full disk refuses writes): the error
  names the shard being written (numpy's own says only "N requested and M written")."""
  tok = CharTokenizer.from_text("ab")
  with full_disk(64_000):
    with pytest.raises(OSError, match=r"writing .*tokens-00000.bin failed: .*is the disk full"):
      prep.prepare(["ab" * 100_000], tok, tmp_path, progress=False)


def test_token_dtype_widens_past_uint16():
  assert prep.token_dtype(65535) == np.uint16
  assert prep.token_dtype(65536) == np.uint32


def test_empty_corpus_is_a_clear_error(tmp_path):
  tok = CharTokenizer.from_text("abc")
  with pytest.raises(DataError, match="empty corpus"):
    prep.prepare(iter([]), tok, tmp_path, progress=False)
  with pytest.raises(DataError, match="no token shards"):
    prep.TokenShards(tmp_path / "missing")


def test_cli_trains_a_tokenizer_and_writes_splits(tmp_path, capsys):
  (tmp_path / "in").mkdir()
  for k in range(3):
    (tmp_path / "in" / f"{k}.txt").write_text(f"document number {k}\n" * 5)
  (tmp_path / "val.jsonl").write_text(json.dumps({"text": "number 7"}) + "\n")
  prep.main(
    [
      "--source",
      str(tmp_path / "in" / "*.txt"),
      "--val_source",
      str(tmp_path / "val.jsonl"),
      "--tokenizer",
      "char",
      "--out",
      str(tmp_path / "out"),
    ]
  )
  assert "3 documents" in capsys.readouterr().out
  train, val = (
    prep.TokenShards(tmp_path / "out" / "train"),
    prep.TokenShards(tmp_path / "out" / "val"),
  )
  assert train.meta["num_documents"] == 3 and val.meta["num_documents"] == 1
  tok = train.tokenizer()
  assert tok.decode(val.read(0, 100)) == "number 7"
