"""Data benchmark: prepare throughput (MB/s) and pretraining loader throughput (tokens/s) on the built-in corpus."""

import os
import sys

if not __package__:  # run as `python bench/data.py`: this folder would shadow the `data` package
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from data import pipeline, sources  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.tokenizer import train_sentencepiece  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--vocab_size", type=int, default=4096)
  p.add_argument("--model_type", default="bpe")
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--runs", type=int, default=5, help="timed runs; the median is reported")
  p.add_argument("--batches", type=int, default=300, help="batches per timed loader run")
  p.add_argument("--warmup", type=int, default=20, help="batches read before timing")
  p.add_argument("--worker_count", type=int, default=0)
  args = p.parse_args()

  docs = list(sources.builtin_corpus("train"))
  t0 = time.perf_counter()
  tok = train_sentencepiece(docs, vocab_size=args.vocab_size, model_type=args.model_type)
  print(
    f"tokenizer: sentencepiece {args.model_type} vocab {tok.vocab_size}, trained in "
    f"{time.perf_counter() - t0:.1f}s on {len(docs)} plays"
  )

  with tempfile.TemporaryDirectory() as tmp:
    rates = []
    for _ in range(args.runs):
      summary = prepare(iter(docs), tok, os.path.join(tmp, "train"), progress=False)
      rates.append(summary["mb_per_s"])
    print(
      f"prepare: {summary['bytes'] / 1e6:.2f} MB -> {summary['num_tokens']} tokens, "
      f"median {statistics.median(rates):.2f} MB/s over {args.runs} runs "
      f"(min {min(rates):.2f}, max {max(rates):.2f})"
    )

    it = pipeline.pretrain_iterator(
      os.path.join(tmp, "train"),
      seq_len=args.seq_len,
      batch_size=args.batch_size,
      seed=0,
      process_index=0,
      process_count=1,
      worker_count=args.worker_count,
    )
    for _ in range(args.warmup):
      next(it)
    rates = []
    for _ in range(args.runs):
      t0 = time.perf_counter()
      for _ in range(args.batches):
        batch = next(it)
      rates.append(args.batches * batch["inputs"].size / (time.perf_counter() - t0))
    it.close()
    print(
      f"loader: seq_len {args.seq_len} batch {args.batch_size} workers {args.worker_count}, "
      f"{it.steps_per_epoch} batches/epoch, median {statistics.median(rates):,.0f} tokens/s over "
      f"{args.runs} runs of {args.batches} batches (min {min(rates):,.0f}, max {max(rates):,.0f})"
    )


if __name__ == "__main__":
  main()
