"""Curation throughput (python -m data.curate's rules) in MB/s on the built-in plays repeated to
a target size, each repeat a near copy (a fraction of its words replaced) or an exact one.

.venv/bin/python -m bench.curate --megabytes 200 [--profile]"""

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


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--megabytes", type=float, default=200)
  p.add_argument("--profile", action="store_true", help="print the top functions by time")
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.jsonl")
    made = build(corpus, args.megabytes)
    print(f"corpus: {made['bytes'] / 1e6:.1f} MB, {made}")
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
