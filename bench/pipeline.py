"""The whole road (`make demo`, rlhf/demo.py) over several seeds: per seed and as the mean,
greedy held-out exact match of every model (overall and on carry cases), the reward model's
held-out pairwise accuracy, PPO's final KL, the EOS rate and the wall time, then each of the
pipeline's acceptance figures against its target.

Each seed runs `python -m rlhf.demo --seed S` in its own process, one at a time, into
WORKDIR/seedS. `--reuse` reads a seed's report.json where one exists instead of running it
again (a finished demo's workdir, e.g. `make demo`'s runs/addition for seed 0, can be given
as --workdir_of=0:runs/addition).

.venv/bin/python -m bench.pipeline [--seeds 0,1,2] [--workdir runs/pipeline] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MODELS = ("pretrained", "sft", "ppo", "dpo", "grpo")


def report_of(seed: int, workdir: str, reuse: bool) -> dict:
  path = os.path.join(workdir, "report.json")
  if not (reuse and os.path.exists(path)):
    cmd = [sys.executable, "-m", "rlhf.demo", f"--workdir={workdir}", f"--seed={seed}"]
    print("running:", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
      sys.exit(f"seed {seed} failed ({done.returncode}):\n{done.stderr[-3000:]}")
  with open(path) as f:
    report = json.load(f)
  if report["seed"] != seed:
    sys.exit(f"{path} is seed {report['seed']}'s report, not seed {seed}'s")
  return report


def figures(report: dict) -> dict:
  m = report["models"]
  row = {}
  for name in MODELS:
    row[f"{name} exact"] = m[name]["exact_match"]
    row[f"{name} carry"] = m[name]["carry_exact_match"]
  row["sft sampled (T=1)"] = m["sft"]["sampled_exact_match"]
  row["rm accuracy"] = report["reward_model"]["accuracy"]
  row["ppo kl"] = m["ppo"]["kl"]
  row["eos rate (min)"] = min(m[name]["eos_rate"] for name in MODELS)
  row["demo s"] = report["times_s"]["total"]
  return row


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--workdir", default="runs/pipeline")
  p.add_argument("--workdir_of", action="append", default=[], help="SEED:DIR, a seed's workdir")
  p.add_argument("--reuse", action="store_true", help="read existing report.json files")
  args = p.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  dirs = {s: os.path.join(args.workdir, f"seed{s}") for s in seeds}
  for item in args.workdir_of:
    seed, _, path = item.partition(":")
    dirs[int(seed)] = path
  rows = {s: figures(report_of(s, dirs[s], args.reuse)) for s in seeds}
  keys = list(rows[seeds[0]])
  mean = {k: sum(rows[s][k] for s in seeds) / len(seeds) for k in keys}

  print("| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
  print("|---|" + "---|" * (len(seeds) + 1))
  for k in keys:
    fmt = (lambda v: f"{v:.0f}") if k == "demo s" else (lambda v: f"{v:.3f}")
    print(f"| {k} | " + " | ".join(fmt(rows[s][k]) for s in seeds) + f" | {fmt(mean[k])} |")

  above = lambda a, b, what: all(rows[s][f"{a} {what}"] > rows[s][f"{b} {what}"] for s in seeds)
  checks = [
    ("reward model held-out accuracy >= 0.95 (mean)", mean["rm accuracy"] >= 0.95),
    ("PPO exact match >= 0.90 (mean)", mean["ppo exact"] >= 0.90),
    ("PPO carry cases >= 0.80 (mean)", mean["ppo carry"] >= 0.80),
    ("PPO above SFT overall, every seed", above("ppo", "sft", "exact")),
    ("PPO above SFT on carry cases, every seed", above("ppo", "sft", "carry")),
    ("EOS rate >= 0.99 (every model, mean)", mean["eos rate (min)"] >= 0.99),
    ("DPO above SFT on carry cases, every seed", above("dpo", "sft", "carry")),
    ("GRPO above SFT on carry cases, every seed", above("grpo", "sft", "carry")),
  ]
  print()
  for what, ok in checks:
    print(f"{'met  ' if ok else 'SHORT'} {what}")


if __name__ == "__main__":
  main()
