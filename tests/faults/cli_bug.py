"""A command-line tool under train.cli.run whose first argument picks an error: a bug in the
tool (`type`), a bug met inside a library (`library`: numpy's ValueError), or bad input
(`input`: a DataError). test_cli runs it: bugs keep their traceback, bad input is one line."""

import numpy as np

from data import sources
from train import cli


def main(argv):
  kind = argv[1]
  if kind == "type":
    return len(3)  # TypeError
  if kind == "library":
    return np.zeros(3).reshape(2)  # ValueError raised in numpy
  return list(sources.read_text_files("/no/such/dir/*.txt"))  # DataError


if __name__ == "__main__":
  cli.run(main)
