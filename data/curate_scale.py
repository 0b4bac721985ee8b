"""The curation rules of data/curate.py at scale, as datatrove pipeline steps run by its
executors (LocalPipelineExecutor here; SlurmPipelineExecutor or RayPipelineExecutor take the
same steps). The output and report equal the one-process run's on the same input and config.

python -m data.curate --source='corpus/*.jsonl' --out=curated --executor=datatrove --tasks=8

Four stages, each a datatrove executor that depends on the one before:
1. `tasks` tasks, each reading its share of the input files: the quality rules and
   decontamination (`Rules`), then `Signatures`: each surviving document is written to
   WORK/docs/RANK.jsonl, with its order in the input, exact-text hash and preview in
   WORK/meta/RANK.jsonl, its full MinHash signature (datasketch's, the same as one process
   computes) in WORK/full/RANK.sig, and its bands in datatrove's signature files.
2. `bands` tasks: datatrove's MinhashDedupBuckets finds documents that share a band.
3. One task (`Decide`): the documents that share a band with an earlier one, in input order,
   are judged as one process judges them: an exact copy of an earlier kept document, else a
   near copy if the signatures estimate a similarity of at least the threshold, else kept.
4. `tasks` tasks (`Keep`): each writes its kept documents to OUT/part-RANK.jsonl.

Counts, contaminated documents and duplicate clusters are gathered into OUT/report.json.
Datatrove skips the tasks that completed, so a run that stops resumes where it stopped."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
  MinhashConfig,
  MinhashDedupBuckets,
  MinhashDedupSignature,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from data import curate, dedup, sources
from data.curate import CurateConfig
from data.sources import DataError

OUTCOME = {1: "exact_duplicate", 2: "near_duplicate"}


def _minhash_config(cfg: CurateConfig) -> MinhashConfig:
  return MinhashConfig(
    n_grams=cfg.shingle,
    num_buckets=cfg.bands,
    hashes_per_bucket=cfg.rows,
    seed=cfg.seed,
    hash_config=HashConfig(precision=32, hash_fc="sha1"),
  )


def _input_files(source: str) -> list[str]:
  if source == "builtin":
    return ["builtin"]
  files = sources.expand_paths(source, suffixes=sources.TEXT_SUFFIXES + sources.JSONL_SUFFIXES)
  if not files:
    raise DataError(f"--source={source!r} matches no text or JSONL files")
  return files


def _dump(folder, name: str, value) -> None:
  with folder.open(name, "w") as f:
    json.dump(value, f)


class Read(PipelineStep):
  """The documents of this task's files (files[rank::world_size] of the sorted list), as
  data/curate.py reads them, each with its place in the input: (file index, position)."""

  name = "curate: read"

  def __init__(self, files: list[str], text_field: str):
    super().__init__()
    self.files, self.text_field = files, text_field

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    for f in range(rank, len(self.files), world_size):
      for i, (doc_id, text) in enumerate(curate.documents(self.files[f], self.text_field)):
        self.stat_update("documents")
        yield Document(text=text, id=doc_id, metadata={"order": [f, i]})


class Rules(BaseFilter):
  """The quality rules and decontamination; counts and contaminated documents are written to
  WORK/counts/rules-RANK.json."""

  name = "curate: quality and decontamination"

  def __init__(self, work: str, cfg: CurateConfig, eval_paths, eval_field: str):
    super().__init__()
    self.work, self.cfg, self.eval_paths, self.eval_field = work, cfg, list(eval_paths), eval_field

  def filter(self, doc: Document):
    found = len(self.contaminated)
    outcome = curate.rules(self.cfg, self.contamination, doc.id, doc.text, self.contaminated)
    for record in self.contaminated[found:]:
      record["order"] = doc.metadata["order"]
    curate.count(self.counts, outcome or "passed", doc.text)
    return (False, outcome) if outcome else True

  def run(self, data, rank: int = 0, world_size: int = 1):
    self.counts, self.contaminated = {}, []
    self.contamination = (
      dedup.Contamination(self.eval_paths, self.cfg.ngram, self.eval_field)
      if self.eval_paths
      else None
    )
    yield from super().run(data, rank, world_size)
    self.counts.pop("passed", None)
    record = {"counts": self.counts, "contaminated": self.contaminated}
    _dump(get_datafolder(self.work), f"counts/rules-{rank:05d}.json", record)


class Words(WordTokenizer):
  """data/dedup.py's words (lower case, no punctuation), as a datatrove word tokenizer: no
  model to load, as datatrove's English ones (spaCy, NLTK) need."""

  def word_tokenize(self, text: str) -> list[str]:
    return dedup.words(text)

  def sent_tokenize(self, text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]

  def span_tokenize(self, text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in dedup.WORDS.finditer(text.lower())]


class Signatures(MinhashDedupSignature):
  """datatrove's signature stage with data/dedup.py's MinHash (so every signature equals the
  one-process run's); it also keeps each document, its metadata and its full signature."""

  name = "curate: signatures"

  def __init__(self, work: str, cfg: CurateConfig):
    super().__init__(os.path.join(work, "sigs"), _minhash_config(cfg), language=Words())
    self.work, self.cfg = work, cfg

  def get_shingles(self, text: str) -> np.ndarray:
    # The whole signature stands in for the shingles: get_signature only splits it in bands.
    cfg = self.cfg
    return dedup.minhash(text, cfg.shingle, cfg.bands * cfg.rows, cfg.seed).hashvalues

  def get_signature(self, signature: np.ndarray) -> list[list[int]]:
    self._full.write(signature.astype("<u4").tobytes())
    return [band.tolist() for band in np.split(signature, self.config.num_buckets)]

  def run(self, data, rank: int = 0, world_size: int = 1):
    folder = get_datafolder(self.work)
    with (
      folder.open(f"docs/{rank:05d}.jsonl", "w") as docs,
      folder.open(f"meta/{rank:05d}.jsonl", "w") as meta,
      folder.open(f"full/{rank:05d}.sig", "wb") as self._full,
    ):

      def kept(data):
        for doc in data:
          docs.write(json.dumps({"text": doc.text, "id": doc.id}) + "\n")
          meta.write(json.dumps(_meta(doc)) + "\n")
          yield doc

      return super().run(kept(data), rank, world_size)


def _meta(doc: Document) -> dict:
  preview = doc.text[: curate.PREVIEW]
  key = dedup.exact_key(doc.text).hex()
  return {"id": doc.id, "order": doc.metadata["order"], "exact": key, "preview": preview}


class Decide(PipelineStep):
  """Judges, in input order, each document that shares a band with another: exact or near copy
  of an earlier kept one, or kept. Writes WORK/decisions/RANK.json ({position: outcome}) and
  WORK/clusters.json."""

  name = "curate: decide duplicates"

  def __init__(self, work: str, cfg: CurateConfig, tasks: int):
    super().__init__()
    self.work, self.cfg, self.tasks = work, cfg, tasks

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    folder = get_datafolder(self.work)
    groups = []  # documents (rank, position) with the same band, from each .dups file
    for name in folder.list_files(subdirectory="dups", glob_pattern="*.dups"):
      with folder.open(name, "rb") as f:
        groups.extend(_groups(read_tuples_from_file(f, "4I")))
    in_groups: dict = {}
    for g, group in enumerate(groups):
      for x in group:
        in_groups.setdefault(x, []).append(g)
    meta, full = self._load(folder, in_groups)
    kept_in = [[] for _ in groups]  # each group's kept documents so far, in input order
    clusters, decisions = {}, [{} for _ in range(self.tasks)]
    for x in sorted(in_groups, key=lambda x: meta[x]["order"]):
      earlier = sorted(
        {k for g in in_groups[x] for k in kept_in[g]}, key=lambda k: meta[k]["order"]
      )
      outcome, best = self._judge(x, earlier, meta, full)
      if outcome:
        decisions[x[0]][x[1]] = outcome
        curate.join_cluster(
          clusters, self.cfg, meta[best[0]]["id"], meta[x]["id"], best[1], meta[x]["preview"]
        )
      else:
        clusters[meta[x]["id"]] = curate.new_cluster(meta[x]["preview"])
        for g in in_groups[x]:
          kept_in[g].append(x)
    for r, decided in enumerate(decisions):
      _dump(folder, f"decisions/{r:05d}.json", decided)
    _dump(folder, "clusters.json", {k: v for k, v in clusters.items() if v["size"] > 1})

  def _judge(self, x, earlier, meta, full):
    """(1 exact | 2 near | 0 kept, (the kept document, similarity))."""
    if self.cfg.exact:
      for k in earlier:
        if meta[k]["exact"] == meta[x]["exact"]:
          return 1, (k, 1.0)
    best = None
    if self.cfg.near:
      for k in earlier:
        similarity = dedup.similarity_of(full[k[0]][k[1]], full[x[0]][x[1]])
        if similarity >= self.cfg.threshold and (best is None or similarity > best[1]):
          best = (k, similarity)
    return (2, best) if best else (0, None)

  def _load(self, folder, wanted):
    """The metadata of the wanted documents, and every task's full signatures."""
    meta, full = {}, []
    width = self.cfg.bands * self.cfg.rows
    for r in range(self.tasks):
      with folder.open(f"meta/{r:05d}.jsonl", "r") as f:
        for i, line in enumerate(f):
          if (r, i) in wanted:
            meta[(r, i)] = json.loads(line)
      with folder.open(f"full/{r:05d}.sig", "rb") as f:
        full.append(np.frombuffer(f.read(), dtype="<u4").reshape(-1, width))
    return meta, full


def _groups(pairs) -> list[list[tuple]]:
  """The groups of documents that one band file's pairs connect. datatrove pairs each document
  with the one before it in sorted order, so a group of equal bands arrives as a chain."""
  parent: dict = {}

  def root(x):
    while parent.setdefault(x, x) != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  for r1, d1, r2, d2 in pairs:
    parent[root((r1, d1))] = root((r2, d2))
  members: dict = {}
  for x in parent:
    members.setdefault(root(x), []).append(x)
  return list(members.values())


class Keep(PipelineStep):
  """Writes this task's kept documents to OUT/part-RANK.jsonl and counts each outcome."""

  name = "curate: keep"

  def __init__(self, work: str, out_dir: str):
    super().__init__()
    self.work, self.out_dir = work, out_dir

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    folder = get_datafolder(self.work)
    with folder.open(f"decisions/{rank:05d}.json", "r") as f:
      decided = {int(k): OUTCOME[v] for k, v in json.load(f).items()}
    counts: dict = {}
    with (
      folder.open(f"docs/{rank:05d}.jsonl", "r") as docs,
      get_datafolder(self.out_dir).open(f"part-{rank:05d}.jsonl", "w") as out,
    ):
      for i, line in enumerate(docs):
        outcome = decided.get(i, "kept")
        curate.count(counts, outcome, json.loads(line)["text"])
        if outcome == "kept":
          out.write(line)
        self.stat_update(outcome)
    counts.pop("in", None)
    _dump(folder, f"counts/keep-{rank:05d}.json", {"counts": counts})
    return iter(())


def executors(source, out_dir, cfg=CurateConfig(), eval_paths=(), text_field="text",
              eval_field="text", tasks=1, workers=1, executor=LocalPipelineExecutor, **kwargs):  # fmt: skip
  """The four stages as executors, each depending on the one before: run the last."""
  files = _input_files(source)
  tasks = max(1, min(tasks, len(files)))
  work = os.path.join(out_dir, "work")
  common = dict(workers=workers, **kwargs)
  first = executor(
    [Read(files, text_field), Rules(work, cfg, eval_paths, eval_field), Signatures(work, cfg)],
    tasks=tasks,
    logging_dir=os.path.join(work, "logs/rules"),
    **common,
  )
  buckets = executor(
    [MinhashDedupBuckets(os.path.join(work, "sigs"), os.path.join(work, "dups"), config=_minhash_config(cfg))],
    tasks=cfg.bands, logging_dir=os.path.join(work, "logs/buckets"), depends=first, **common,
  )  # fmt: skip
  decide = executor(
    [Decide(work, cfg, tasks)],
    tasks=1,
    logging_dir=os.path.join(work, "logs/decide"),
    depends=buckets,
    **{**common, "workers": 1},
  )
  return [first, buckets, decide, executor(
    [Keep(work, out_dir)], tasks=tasks, logging_dir=os.path.join(work, "logs/keep"), depends=decide, **common
  )]  # fmt: skip


def curate_at_scale(source, out_dir, cfg=CurateConfig(), eval_paths=(), text_field="text",
                    eval_field="text", tasks=1, workers=1, stop_after_stage=None) -> dict:  # fmt: skip
  """Runs the four stages on datatrove's local executor (resuming a run that stopped) and
  returns the report, which equals data.curate.curate's on the same input and config.
  `stop_after_stage` (1-4) stops there and returns {}, as a run stopped then would (tests)."""
  config = {
    **dataclasses.asdict(cfg),
    "source": source,
    "eval": sorted(map(str, eval_paths)),
    "text_field": text_field,
    "eval_field": eval_field,
    "state_version": curate.STATE_VERSION,
  }
  files = _input_files(source)
  # What splits the work: a resume with other tasks or files would mix two splits.
  layout = {"tasks": max(1, min(tasks, len(files))), "files": files}
  work = get_datafolder(os.path.join(out_dir, "work"))
  if work.exists("config.json"):
    with work.open("config.json", "r") as f:
      before = json.load(f)
    if before != json.loads(json.dumps({**config, **layout})):
      changed = sorted(k for k, v in {**config, **layout}.items() if before.get(k) != v)
      raise DataError(
        f"{out_dir} holds a curation stopped under another config ({', '.join(changed)} "
        f"differ); use another --out, or delete {os.path.join(out_dir, 'work')} to start over"
      )
  else:
    _dump(work, "config.json", {**config, **layout})
  steps = executors(source, out_dir, cfg, eval_paths, text_field, eval_field, tasks, workers)
  if stop_after_stage is not None:
    steps[stop_after_stage - 1].run()
    return {}
  steps[-1].run()
  report = gather(out_dir, config)
  with get_datafolder(out_dir).open(curate.REPORT, "w") as f:
    json.dump(report, f, indent=1)
  return report


def gather(out_dir: str, config: dict) -> dict:
  """The report from the tasks' counts, contaminated documents and the duplicate clusters."""
  work = get_datafolder(os.path.join(out_dir, "work"))
  counts, contaminated = {}, []
  for name in work.list_files(subdirectory="counts"):
    with work.open(name, "r") as f:
      record = json.load(f)
    for key, row in record["counts"].items():
      counts[key] = [a + b for a, b in zip(counts.get(key, [0, 0, 0]), row)]
    contaminated.extend(record.get("contaminated", ()))
  contaminated.sort(key=lambda c: c["order"])
  for c in contaminated:
    del c["order"]
  with work.open("clusters.json", "r") as f:
    clusters = json.load(f)
  return curate.report_of(counts, clusters, contaminated, config)
