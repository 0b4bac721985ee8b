"""datatrove's own implementation of data/curate.py's rules, for bench/curate.py --compare:
GopherQualityFilter, GopherRepetitionFilter, FineWeb's line-punctuation rule (its other rules
off), and its 4-stage MinHash deduplication with the same shingle size, bands and rows. The
word tokenizer is data/curate_scale.py's regex one (datatrove's English ones need spaCy or
NLTK models, which cost more); reading is data/curate_scale.py's, writing a plain JSONL step."""

from __future__ import annotations

import json
import os

from datatrove.executor import LocalPipelineExecutor
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
  MinhashDedupBuckets,
  MinhashDedupCluster,
  MinhashDedupFilter,
  MinhashDedupSignature,
)
from datatrove.pipeline.filters import (
  FineWebQualityFilter,
  GopherQualityFilter,
  GopherRepetitionFilter,
)

from data import curate_scale
from data.curate import CurateConfig


class Write(PipelineStep):
  """Each document to FOLDER/RANK.jsonl as {"text", "id"}, passed on."""

  name = "write"

  def __init__(self, folder: str):
    super().__init__()
    self.folder = folder

  def run(self, data, rank: int = 0, world_size: int = 1):
    with get_datafolder(self.folder).open(f"{rank:05d}.jsonl", "w") as f:
      for doc in data:
        f.write(json.dumps({"text": doc.text, "id": doc.id}) + "\n")
        yield doc


def run(source: str, out: str, cfg: CurateConfig, tasks: int = 8, workers: int = 1) -> int:
  """Runs the pipeline and returns the number of documents kept."""
  files = curate_scale._input_files(source)
  words = curate_scale.Words()
  minhash = curate_scale._minhash_config(cfg)
  common = dict(workers=workers)
  logs = lambda name: os.path.join(out, "logs", name)
  rules = LocalPipelineExecutor(
    [
      curate_scale.Read(files, "text"),
      GopherQualityFilter(language=words),
      GopherRepetitionFilter(language=words),
      FineWebQualityFilter(
        short_line_thr=1.0, char_duplicates_ratio=1.0, new_line_ratio=1e9, language=words
      ),
      Write(os.path.join(out, "filtered")),
      MinhashDedupSignature(os.path.join(out, "sigs"), minhash, language=words),
    ],
    tasks=min(tasks, len(files)), logging_dir=logs("rules"), **common,
  )  # fmt: skip
  buckets = LocalPipelineExecutor(
    [MinhashDedupBuckets(os.path.join(out, "sigs"), os.path.join(out, "dups"), config=minhash)],
    tasks=cfg.bands, logging_dir=logs("buckets"), depends=rules, **common,
  )  # fmt: skip
  cluster = LocalPipelineExecutor(
    [MinhashDedupCluster(os.path.join(out, "dups"), os.path.join(out, "remove"), config=minhash)],
    tasks=1, logging_dir=logs("cluster"), depends=buckets,
  )  # fmt: skip
  keep = LocalPipelineExecutor(
    [
      ReadFiltered(os.path.join(out, "filtered")),
      MinhashDedupFilter(os.path.join(out, "remove")),
      Write(os.path.join(out, "kept")),
    ],
    tasks=min(tasks, len(files)), logging_dir=logs("keep"), depends=cluster, **common,
  )  # fmt: skip
  keep.run()
  kept = get_datafolder(os.path.join(out, "kept"))
  return sum(sum(1 for _ in kept.open(n, "r")) for n in kept.list_files())


class ReadFiltered(PipelineStep):
  """FOLDER/RANK.jsonl, the documents the first stage kept, in order."""

  name = "read filtered"

  def __init__(self, folder: str):
    super().__init__()
    self.folder = folder

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    from datatrove.data import Document

    with get_datafolder(self.folder).open(f"{rank:05d}.jsonl", "r") as f:
      for line in f:
        record = json.loads(line)
        yield Document(text=record["text"], id=record["id"])
