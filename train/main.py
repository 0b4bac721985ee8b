"""Command line: python -m train.main --config=configs/experiments/<name>.py --workdir=DIR."""

from __future__ import annotations

import os

from absl import flags, logging

from train import cli

_CONFIG = cli.define_config("config", None, "experiment config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "where data, checkpoints and logs go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  from train import distributed

  # Before JAX starts: device counts and jax.distributed must be set up first.
  print("jax.distributed:", distributed.initialize(_CONFIG.value.get("distributed")))
  from train import loop  # after flags: JAX starts here, with XLA_FLAGS already set

  summary = loop.train(_CONFIG.value, _WORKDIR.value)
  for key in ("sample_before", "sample_after"):
    if key in summary:
      print(f"\n--- {key.replace('_', ' ')} ---\n{summary[key]}\n")
  print(f"workdir: {os.path.abspath(_WORKDIR.value)}")


if __name__ == "__main__":
  cli.run(main)
