"""shakespeare_char over several seeds, ours against the PyTorch peer (bench/char_parity.py).

Seed S sets our init seed and both implementations' batch order (the same batches for both);
the peer's init draws from torch's RNG with seed S. `--which nanogpt` trains the peer on
nanoGPT's own get_batch instead (torch.randint offsets seeded 1337 + S). Each run is a
separate process, one at a time. Prints each run's whole-split validation loss and, per implementation, mean, standard
deviation, median and how many runs reach <= 1.90.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile

_VAL = re.compile(r"val loss ([0-9.]+)")


def _val_loss(cmd: list[str]) -> float:
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode != 0:
    sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
  found = _VAL.findall(out.stdout)
  if not found:
    sys.exit(f"no 'val loss' in the output of {' '.join(cmd)}:\n{out.stdout[-2000:]}")
  return float(found[-1])


def ours(seed: int, steps: int) -> float:
  with tempfile.TemporaryDirectory(prefix="char_seeds_") as workdir:
    return _val_loss(
      [
        sys.executable,
        "-m",
        "train.main",
        "--config=configs/experiments/shakespeare_char.py",
        f"--workdir={workdir}",
        f"--config.train.seed={seed}",
        f"--config.data.seed={seed}",
        f"--config.train.steps={steps}",
        "--config.train.eval_every=0",
        "--config.train.checkpoint_every=0",
        "--config.train.progress=False",
      ]
    )


def peer(seed: int, steps: int) -> float:
  return _val_loss(
    [
      sys.executable,
      "-m",
      "bench.char_parity",
      f"--seed={seed}",
      f"--data_seed={seed}",
      f"--steps={steps}",
    ]
  )


def nanogpt(seed: int, steps: int) -> float:
  return _val_loss(
    [
      sys.executable,
      "-m",
      "bench.char_parity",
      f"--seed={seed}",
      "--batches=nanogpt",
      f"--steps={steps}",
    ]
  )


def summarize(name: str, losses: list[float], target: float) -> str:
  sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
  hits = sum(x <= target for x in losses)
  return (
    f"{name}: mean {statistics.mean(losses):.4f}, sd {sd:.4f}, median "
    f"{statistics.median(losses):.4f}, min {min(losses):.4f}, max {max(losses):.4f}, "
    f"<= {target}: {hits}/{len(losses)}"
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--target", type=float, default=1.90)
  ap.add_argument(
    "--which",
    choices=("both", "ours", "peer", "nanogpt"),
    default="both",
    help="both = ours and the peer; nanogpt = the peer on nanoGPT's get_batch",
  )
  args = ap.parse_args()
  runs = {"ours": ours, "peer": peer, "nanogpt": nanogpt}
  names = ["ours", "peer"] if args.which == "both" else [args.which]
  results: dict[str, list[float]] = {n: [] for n in names}
  print("seed | " + " | ".join(names), flush=True)
  for seed in args.seeds:
    row = [runs[n](seed, args.steps) for n in names]
    for n, x in zip(names, row):
      results[n].append(x)
    print(f"{seed} | " + " | ".join(f"{x:.4f}" for x in row), flush=True)
  for n in names:
    print(summarize(n, results[n], args.target))


if __name__ == "__main__":
  main()
