"""Curation before prepare: quality rules, decontamination against evaluation files, exact
and near-duplicate removal, streamed, with a report. Resumable and deterministic.

python -m data.curate --source='corpus/*.jsonl' --eval='evals/*.jsonl' --out=curated
python -m data.prepare --source='curated/part-*.jsonl' --out=prepared

Each document is checked in order: the quality rules (data/quality.py), then evaluation
n-grams, then an exact copy of a kept document, then a near copy (data/dedup.py); the first
that applies removes it and is counted. Kept documents go to DIR/part-NNNNN.jsonl as
{"text", "id"}; DIR/report.json holds the counts, duplicate clusters with examples, and each
contaminated document with the evaluation line it shares. Every `checkpoint_docs` documents
the state (the kept hashes and signatures, counts, the part written) is saved; a run that
stops resumes from it, and a run from scratch gives the same output."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from collections.abc import Iterator

import tqdm

from data import dedup, quality, sources
from data.sources import DataError

STATE, REPORT = "curate_state.pkl", "report.json"
STATE_VERSION = 2  # what a saved state holds; a state of another version is refused
PREVIEW = 120  # characters of a document shown in the report


@dataclasses.dataclass(frozen=True)
class CurateConfig:
  quality: bool = True
  skip_rules: tuple = ()  # quality.RULES not applied
  exact: bool = True
  near: bool = True
  threshold: float = 0.8  # near-duplicates: estimated Jaccard similarity of word shingles
  shingle: int = 5  # words per shingle
  bands: int = 32  # LSH bands; bands x rows hashes per document
  rows: int = 4
  seed: int = 1  # MinHash permutations
  ngram: int = 13  # decontamination: words shared with an evaluation passage
  decontaminate: str = "drop"  # drop | report (keep and list)
  checkpoint_docs: int = 10_000
  examples: int = 3  # duplicates listed per cluster in the report

  def __post_init__(self):
    if self.decontaminate not in ("drop", "report"):
      raise DataError(f"decontaminate={self.decontaminate!r}: choose drop or report")
    unknown = set(self.skip_rules) - set(quality.RULES)
    if unknown:
      raise DataError(f"skip_rules {sorted(unknown)} are not rules: {', '.join(quality.RULES)}")
    if not 0 < self.threshold <= 1:
      raise DataError(f"threshold={self.threshold} must be in (0, 1]")


def documents(source: str, text_field: str = "text") -> Iterator[tuple[str, str]]:
  """(id, text) of each document: the built-in plays, JSONL records (FILE:LINE) or text files
  (one document each)."""
  if source == "builtin":
    yield from sources.shakespeare_plays("train")
    return
  for path in sources.expand_paths(source, suffixes=sources.TEXT_SUFFIXES + sources.JSONL_SUFFIXES):
    if path.endswith(sources.JSONL_SUFFIXES):
      for file, lineno, record in sources.iter_jsonl(path):
        value = record.get(text_field)
        if not isinstance(value, str):
          raise DataError(f"{file}:{lineno}: missing text field {text_field!r}")
        yield f"{file}:{lineno}", value
    else:
      yield path, sources.read_text(path)


@dataclasses.dataclass
class _State:
  config: dict
  docs: int = 0  # documents read so far
  part: int = 0  # parts written so far (closed)
  counts: dict = dataclasses.field(default_factory=dict)  # outcome -> [docs, words, bytes]
  exact: dict = dataclasses.field(default_factory=dict)  # normalised hash -> kept id
  near: dedup.NearDuplicates | None = None
  clusters: dict = dataclasses.field(default_factory=dict)  # kept id -> cluster
  contaminated: list = dataclasses.field(default_factory=list)


def curate(
  source: str,
  out_dir: str,
  cfg: CurateConfig = CurateConfig(),
  eval_paths=(),
  text_field: str = "text",
  eval_field: str = "text",
  progress: bool = True,
  stop_after: int | None = None,
) -> dict:
  """Curates `source` into `out_dir` (resuming a run that stopped) and returns the report.
  `stop_after` stops after that many documents, as a killed run would (for tests)."""
  os.makedirs(out_dir, exist_ok=True)
  config = {
    **dataclasses.asdict(cfg),
    "source": source,
    "eval": sorted(map(str, eval_paths)),
    "text_field": text_field,
    "eval_field": eval_field,
    "state_version": STATE_VERSION,
  }
  state = _resume(out_dir, config) or _State(
    config=config,
    near=dedup.NearDuplicates(cfg.threshold, cfg.shingle, cfg.bands, cfg.rows, cfg.seed),
  )
  contamination = dedup.Contamination(eval_paths, cfg.ngram, eval_field) if eval_paths else None
  part = _open_part(out_dir, state.part)
  bar = tqdm.tqdm(desc="curate", unit="doc", initial=state.docs, disable=not progress)
  try:
    for i, (doc_id, text) in enumerate(documents(source, text_field)):
      if i < state.docs:
        continue  # written before the checkpoint this run resumed from
      if stop_after is not None and i >= stop_after:
        return {}
      outcome = _judge(state, cfg, contamination, doc_id, text)
      count(state.counts, outcome, text)
      if outcome == "kept":
        part.write(json.dumps({"text": text, "id": doc_id}) + "\n")
      state.docs = i + 1
      bar.update(1)
      if state.docs % cfg.checkpoint_docs == 0:
        part.close()
        state.part += 1
        _save(out_dir, state)
        part = _open_part(out_dir, state.part)
  finally:
    part.close()
    bar.close()
  state.part += 1
  report = report_of(state.counts, state.clusters, state.contaminated, state.config)
  with open(os.path.join(out_dir, REPORT), "w") as f:
    json.dump(report, f, indent=1)
  if os.path.exists(os.path.join(out_dir, STATE)):
    os.remove(os.path.join(out_dir, STATE))
  return report


def _judge(state: _State, cfg: CurateConfig, contamination, doc_id: str, text: str) -> str:
  """What happens to one document: 'kept', or the rule that removes it."""
  outcome = rules(cfg, contamination, doc_id, text, state.contaminated)
  if outcome:
    return outcome
  key = dedup.exact_key(text)
  if cfg.exact and key in state.exact:
    join_cluster(state.clusters, cfg, state.exact[key], doc_id, 1.0, text)
    return "exact_duplicate"
  m = state.near.minhash(text) if cfg.near else None
  if m is not None:
    found = state.near.find(m)
    if found:
      join_cluster(state.clusters, cfg, found[0], doc_id, found[1], text)
      return "near_duplicate"
    state.near.add(doc_id, m)
  state.exact.setdefault(key, doc_id)
  state.clusters.setdefault(doc_id, new_cluster(text))
  return "kept"


def rules(
  cfg: CurateConfig, contamination, doc_id: str, text: str, contaminated: list
) -> str | None:
  """The quality rule or contamination that removes a document, or None. A contaminated
  document is appended to `contaminated` (and kept under decontaminate=report)."""
  if cfg.quality:
    rule = quality.check(text, skip=cfg.skip_rules)
    if rule:
      return f"quality:{rule}"
  if contamination is not None:
    hit = contamination.find(text)
    if hit:
      file, lineno, line, shared = hit
      contaminated.append(
        {
          "id": doc_id,
          "eval_file": file,
          "eval_line": lineno,
          "eval_text": line[:PREVIEW],
          "shared": shared,
          "dropped": cfg.decontaminate == "drop",
        }
      )
      if cfg.decontaminate == "drop":
        return "contaminated"
  return None


def new_cluster(text: str) -> dict:
  return {"preview": text[:PREVIEW], "size": 1, "examples": []}


def join_cluster(
  clusters: dict, cfg: CurateConfig, kept: str, doc_id: str, similarity, text
) -> None:
  cluster = clusters[kept]
  cluster["size"] += 1
  if len(cluster["examples"]) < cfg.examples:
    cluster["examples"].append(
      {"id": doc_id, "similarity": round(similarity, 3), "preview": text[:PREVIEW]}
    )


def count(counts: dict, outcome: str, text: str) -> None:
  """Adds a document to the 'in' row and its outcome's row: [documents, words, bytes]."""
  for key in ("in", outcome):
    row = counts.setdefault(key, [0, 0, 0])
    row[0] += 1
    row[1] += len(text.split())
    row[2] += len(text.encode("utf-8"))


def report_of(counts: dict, clusters: dict, contaminated: list, config: dict) -> dict:
  fields = ("documents", "words", "bytes")
  counts = {k: dict(zip(fields, v)) for k, v in counts.items()}
  zero = dict.fromkeys(fields, 0)
  removed = {k: v for k, v in counts.items() if k not in ("in", "kept")}
  clusters = sorted(
    ({"kept": k, **v} for k, v in clusters.items() if v["size"] > 1),
    key=lambda c: (-c["size"], c["kept"]),
  )
  return {
    "in": counts.get("in", zero),
    "kept": counts.get("kept", zero),
    "removed": dict(sorted(removed.items())),
    "duplicate_clusters": clusters,
    "contaminated": contaminated,
    "config": config,
  }


def _open_part(out_dir: str, index: int):
  for name in os.listdir(out_dir):  # parts after the checkpoint: written by a run that stopped
    if name.startswith("part-") and int(name[5:10]) >= index:
      os.remove(os.path.join(out_dir, name))
  return open(os.path.join(out_dir, f"part-{index:05d}.jsonl"), "w", encoding="utf-8")


def _save(out_dir: str, state: _State) -> None:
  tmp = os.path.join(out_dir, STATE + ".tmp")
  with open(tmp, "wb") as f:
    pickle.dump(state, f)
  os.replace(tmp, os.path.join(out_dir, STATE))


def _resume(out_dir: str, config: dict) -> _State | None:
  path = os.path.join(out_dir, STATE)
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    state = pickle.load(f)
  if state.config != config:
    changed = sorted(k for k in config if config[k] != state.config.get(k))
    raise DataError(
      f"{out_dir} holds a curation stopped under another config ({', '.join(changed)} differ); "
      f"use another --out, or delete {path} to start over"
    )
  return state


def table(report: dict) -> str:
  rows = [("in", report["in"]), *report["removed"].items(), ("kept", report["kept"])]
  lines = [f"{'':<34}{'documents':>11}{'words':>13}{'bytes':>15}"]
  for name, c in rows:
    lines.append(f"{name:<34}{c['documents']:>11}{c['words']:>13}{c['bytes']:>15}")
  lines.append(
    f"duplicate clusters: {len(report['duplicate_clusters'])}; "
    f"contaminated documents: {len(report['contaminated'])}"
  )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  from data.prepare import DEBUG_ENV, OneLineParser

  p = OneLineParser(prog="python -m data.curate", description=__doc__)
  p.add_argument("--source", required=True, help="'builtin', or text/JSONL files, dirs, globs")
  p.add_argument("--text_field", default="text", help="JSONL field holding the document text")
  p.add_argument("--eval", action="append", default=[], help="evaluation files (repeatable)")
  p.add_argument("--eval_field", default="text", help="JSONL field of an evaluation passage")
  p.add_argument("--out", required=True, help="output directory: part-*.jsonl and report.json")
  p.add_argument("--no_quality", action="store_true", help="skip every quality rule")
  p.add_argument("--skip_rules", default="", help=f"comma-separated: {', '.join(quality.RULES)}")
  p.add_argument("--no_exact", action="store_true", help="keep exact duplicates")
  p.add_argument("--no_near", action="store_true", help="keep near duplicates")
  for field in ("threshold", "shingle", "bands", "rows", "seed", "ngram", "checkpoint_docs"):
    default = getattr(CurateConfig, field)
    p.add_argument(f"--{field}", type=type(default), default=default, help=f"default {default}")
  p.add_argument("--decontaminate", default="drop", help="drop | report")
  p.add_argument(
    "--executor",
    default="process",
    choices=("process", "datatrove"),
    help="process: one process, in order; datatrove: the same rules and output as datatrove "
    "steps on its local executor (data/curate_scale.py)",
  )
  p.add_argument("--tasks", type=int, default=1, help="datatrove tasks (input files split)")
  p.add_argument("--workers", type=int, default=1, help="datatrove processes at once")
  p.add_argument("--debug", action="store_true", help=f"show an error's traceback ({DEBUG_ENV})")
  args = p.parse_args(argv)
  try:
    cfg = CurateConfig(
      quality=not args.no_quality,
      skip_rules=tuple(r for r in args.skip_rules.split(",") if r),
      exact=not args.no_exact,
      near=not args.no_near,
      **{k: getattr(args, k) for k in ("threshold", "shingle", "bands", "rows", "seed", "ngram")},
      decontaminate=args.decontaminate,
      checkpoint_docs=args.checkpoint_docs,
    )
    inputs = (args.source, args.out, cfg, args.eval, args.text_field, args.eval_field)
    if args.executor == "datatrove":
      report = _scale().curate_at_scale(*inputs, tasks=args.tasks, workers=args.workers)
    else:
      report = curate(*inputs)
    print(table(report))
  except (ValueError, OSError, KeyboardInterrupt) as e:
    p.fail(e, args.debug)


def _scale():
  try:
    from data import curate_scale
  except ImportError as e:
    raise DataError(f"--executor=datatrove needs datatrove ({e}): pip install -e '.[scale]'") from e
  return curate_scale


if __name__ == "__main__":
  main()
