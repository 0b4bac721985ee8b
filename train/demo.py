"""`make demo-shakespeare`: train a tokenizer and a small model on the built-in corpus, sample
before and after, plot the loss, and say where everything went."""

from __future__ import annotations

import os
import shutil
import sys

from absl import logging


def main(workdir: str = "runs/demo") -> None:
  logging.set_verbosity(logging.WARNING)
  from configs.experiments import shakespeare
  from train import loop

  config = shakespeare.get_config()
  # About 3 minutes on 2 idle cores; on a slower or busy machine stop training at 5 minutes
  # (checkpoint, evaluate, sample) so the demo still ends in a few minutes.
  config.train.max_seconds = 300.0
  if os.path.exists(workdir):  # the demo always starts from scratch
    shutil.rmtree(workdir)
  print(
    f"fromscratch demo: tokenizer + {config.train.steps}-step pretraining on Shakespeare's "
    f"plays (built-in corpus), workdir {workdir}\n"
  )
  summary = loop.train(config, workdir)
  print("\n=== sample before training ===\n" + summary["sample_before"])
  print("\n=== sample after training ===\n" + summary["sample_after"])
  print(
    f"\nparameters: {summary['params']:,}; steps: {summary['final_step']}; "
    f"train time {summary['train_seconds']:.0f} s; "
    f"{summary['tokens_per_s']:.0f} tokens/s; val loss {summary['val_loss']:.3f}"
  )
  print(f"\nwhere everything went ({os.path.abspath(workdir)}):")
  for name, what in (
    ("tokenizer/", "the trained sentencepiece tokenizer"),
    ("data/", "token shards of train and validation"),
    ("checkpoints/", "orbax checkpoints (resume: run again with train.main)"),
    ("metrics.jsonl", "every logged metric"),
    ("tensorboard/", "TensorBoard scalars: tensorboard --logdir " + workdir),
    ("loss.png", "the loss curve"),
    ("summary.json", "the run's summary"),
  ):
    print(f"  {name:<14} {what}")
  print(f"\nsample again: .venv/bin/python -m train.sample --workdir={workdir} --prompt='ROMEO:'")


if __name__ == "__main__":
  main(*sys.argv[1:2])
