"""Curation throughput (python -m data.curate's rules) in MB/s on the built-in plays repeated to
a target size, each repeat a near copy (a fraction of its words replaced) or an exact one.

.venv/bin/python -m bench.curate --megabytes 200 [--profile]
.venv/bin/python -m bench.curate --megabytes 200 --compare

--compare runs, on the same corpus split in 8 files: ours in one process; ours as datatrove
steps (data/curate_scale.py) with 1 and 2 workers; and datatrove's own implementation of the
same rules (GopherQualityFilter, GopherRepetitionFilter, FineWeb's line-punctuation rule, its
4-stage MinHash deduplication with the same shingles, bands and rows) with 1 and 2 workers."""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import tempfile
import time

import numpy as np

from data import curate, sources


def build(path: str, megabytes: float, seed: int = 0) -> dict:
  """JSONL of the plays, then copies of them until `megabytes`: a third exact, the rest with 0.2%
  to 5% of their words replaced by other words of the corpus (5-shingle similarity about 0.98
  down to 0.6)."""
  rng = np.random.default_rng(seed)
  plays = [text for _, text in sources.shakespeare_plays("all")]
  vocab = np.array(sorted({w for text in plays[:4] for w in text.split()}))
  size, counts = 0, {"original": 0, "exact": 0, "near": 0}
  with open(path, "w") as f:
    k = 0
    while size < megabytes * 1e6:
      text = plays[k % len(plays)]
      kind = "original" if k < len(plays) else ("exact" if k % 3 == 0 else "near")
      if kind == "near":
        words = text.split(" ")
        n = int(len(words) * rng.uniform(0.002, 0.05))
        for i, w in zip(rng.choice(len(words), n, replace=False), rng.choice(vocab, n)):
          words[i] = str(w)
        text = " ".join(words)
      line = json.dumps({"text": text}) + "\n"
      f.write(line)
      size += len(text.encode("utf-8"))
      counts[kind] += 1
      k += 1
  return {"bytes": size, **counts}


def split(corpus: str, files: int) -> str:
  lines = open(corpus).readlines()
  folder = os.path.join(os.path.dirname(corpus), "split")
  os.makedirs(folder)
  for k in range(files):
    with open(os.path.join(folder, f"{k:03d}.jsonl"), "w") as f:
      f.writelines(lines[k::files])
  return os.path.join(folder, "*.jsonl")


def timed(name: str, megabytes: float, fn) -> float:
  start = time.perf_counter()
  kept = fn()
  seconds = time.perf_counter() - start
  print(f"{name:<44} {megabytes / seconds:6.2f} MB/s {seconds:7.1f} s  kept {kept}", flush=True)
  return seconds


def compare(corpus: str, megabytes: float, tmp: str) -> None:
  from bench import curate_peer
  from data import curate_scale

  source = split(corpus, 8)
  cfg = curate.CurateConfig()
  kept = lambda r: r["kept"]["documents"]
  run = lambda out, **kw: kept(curate_scale.curate_at_scale(source, out, cfg, **kw))
  timed(
    "ours, one process",
    megabytes,
    lambda: kept(curate.curate(source, f"{tmp}/one", cfg, progress=False)),
  )
  timed("ours on datatrove, 8 tasks, 1 worker", megabytes, lambda: run(f"{tmp}/dt1", tasks=8))
  timed(
    "ours on datatrove, 8 tasks, 2 workers",
    megabytes,
    lambda: run(f"{tmp}/dt2", tasks=8, workers=2),
  )
  for workers in (1, 2):
    timed(f"datatrove's rules, 8 tasks, {workers} worker(s)", megabytes,
          lambda w=workers: curate_peer.run(source, f"{tmp}/peer{w}", cfg, tasks=8, workers=w))  # fmt: skip


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--megabytes", type=float, default=200)
  p.add_argument("--profile", action="store_true", help="print the top functions by time")
  p.add_argument("--compare", action="store_true", help="side by side with datatrove")
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.jsonl")
    made = build(corpus, args.megabytes)
    print(f"corpus: {made['bytes'] / 1e6:.1f} MB, {made}")
    if args.compare:
      return compare(corpus, made["bytes"] / 1e6, tmp)
    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profiler:
      profiler.enable()
    report = curate.curate(corpus, os.path.join(tmp, "out"), progress=False)
    if profiler:
      profiler.disable()
    seconds = time.perf_counter() - start
    print(curate.table(report))
    print(f"{made['bytes'] / 1e6 / seconds:.2f} MB/s ({seconds:.1f} s, {os.cpu_count()} CPUs)")
    if profiler:
      pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
  main()
