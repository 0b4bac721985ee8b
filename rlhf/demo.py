"""`make demo`: the whole road on two-digit addition, from nothing to an aligned model.

1. the task's files (rlhf/tasks.py) and a character tokenizer with token shards of the
   equations (python -m data.prepare);
2. pretraining on correct equations;
3. SFT on a flawed demonstrator that drops the carry on 60% of carry cases;
4. preference pairs from two samples of the SFT model per prompt, labelled by the true
   answer, and a reward model on them;
5. PPO against the reward model;
6. DPO on the same pairs and GRPO with the exact-match reward, both from the SFT model;

then a table of greedy exact match on held-out problems (overall and on carry cases) for
every model, the reward model's held-out accuracy, the final KL, the EOS rate and each stage's
wall time, and a plot of accuracy and KL over RL iterations. Every stage runs through the
loop `python -m train.main` runs, with configs/experiments/addition.py:STAGE.

.venv/bin/python -m rlhf.demo [--workdir runs/addition] [--seed 0] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import time

import numpy as np

STAGES = ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")


def stage_config(stage: str, seed: int, scale: float, configure=None):
  """configs/experiments/addition.py's config for `stage`, its step count times `scale`, then
  passed to configure(stage, config) when given (to override fields, as flags would)."""
  from configs.experiments import addition

  c = addition.get_config(stage)
  c.train.steps = max(1, int(round(c.train.steps * scale)))
  c.train.log_every = max(1, min(c.train.log_every, c.train.steps // 10 or 1))
  c.train.seed = seed
  if "data" in c and "seed" in c.data:
    c.data.seed = seed
  if "rlhf" in c and "seed" in c.rlhf:
    c.rlhf.seed = seed
  if configure is not None:
    configure(stage, c)
  return c


def run_stage(stage: str, config, workdir: str, times: dict) -> dict:
  from train import loop

  t0 = time.perf_counter()
  print(f"--- {stage}: {config.stage}, {config.train.steps} steps -> {workdir}", flush=True)
  summary = loop.train(config, workdir)
  times[stage] = time.perf_counter() - t0
  return summary


# ---------------------------------------------------------------- greedy answers


@functools.lru_cache
def _sampler(cfg):
  """One sampler per architecture: its compiled steps serve every checkpoint of that shape."""
  from flax import nnx

  from model.sampling import Sampler
  from model.transformer import Transformer

  return Sampler(nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))))


def answers(
  workdir: str,
  prompts: list[str],
  *,
  chat: bool,
  temperature: float = 0.0,
  seed: int = 0,
  step: int = 0,
):
  """Each prompt's completion by the workdir's latest model: greedy (temperature 0) or
  sampled; a chat model answers the rendered chat prompt, a pretrained model continues
  BOS + the prompt. Completions end at the model's end marker (EOS for the pretrained one).
  Returns (completions, ended)."""
  import jax

  from data.chat import render_prompt
  from model.sampling import SamplingConfig, left_pad
  from train import weights

  cfg, _, params, tok = weights.load_for_inference(workdir, step or None)
  end = tok.end_id if chat else tok.eos_id
  if chat:
    ids = [render_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
  else:
    ids = [tok.encode(p, bos=True) for p in prompts]
  tokens, mask = left_pad(ids, tok.pad_id)
  sampler = _sampler(cfg)
  scfg = SamplingConfig(max_new_tokens=5, temperature=temperature, eos_id=end, pad_id=tok.pad_id)
  out = sampler(params, tokens, mask, jax.random.PRNGKey(seed), scfg)
  toks, m = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)
  texts, ended = [], []
  for row, row_mask in zip(toks, m):
    ids = [int(t) for t in row[row_mask > 0]]
    ended.append(end in ids)
    texts.append(tok.decode([t for t in ids if t != end]))
  return texts, np.asarray(ended)


def evaluate(workdir: str, heldout: list[dict], *, chat: bool, seed: int = 0) -> dict:
  """Greedy exact match (overall, carry and no-carry cases) and EOS rate on the held-out
  problems, and exact match of one sample each at temperature 1 (what imitation of the
  demonstrator predicts: greedy decoding answers a carry case right only where the right
  answer is the more likely one)."""
  from rlhf import tasks

  prompts = [r["prompt"] for r in heldout]
  texts, ended = answers(workdir, prompts, chat=chat)
  sampled, _ = answers(workdir, prompts, chat=chat, temperature=1.0, seed=seed)
  got = tasks.accuracy(prompts, sampled)
  return {
    **tasks.accuracy(prompts, texts),
    "eos_rate": float(ended.mean()),
    "sampled_exact_match": got["exact_match"],
    "sampled_carry_exact_match": got["carry_exact_match"],
  }


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


# ---------------------------------------------------------------- the road


def checkpoint_steps(workdir: str) -> list[int]:
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def rl_curve(workdir: str, heldout: list[dict], start: dict) -> list[dict]:
  """Held-out greedy accuracy at each kept checkpoint of an RL run, with the run's logged KL
  at that step (PPO's summed k1 per episode; GRPO's per-token k3 from its loss), after
  `start`: the figures of the model it started from, at step 0 with KL 0."""
  from rlhf import tasks
  from train.metrics import read_metrics

  kl_at = {}
  for r in read_metrics(os.path.join(workdir, "metrics.jsonl")):
    if r.get("split") == "train":
      kl = r.get("kl", r.get("policy/kl"))
      if kl is not None:
        kl_at[r["step"]] = kl
  keys = ("exact_match", "carry_exact_match", "no_carry_exact_match", "problems")
  curve = [{"step": 0, **{k: start[k] for k in keys}, "kl": 0.0}]
  prompts = [r["prompt"] for r in heldout]
  for step in checkpoint_steps(workdir):
    texts, _ = answers(workdir, prompts, chat=True, step=step)
    acc = tasks.accuracy(prompts, texts)
    near = max((s for s in kl_at if s <= step), default=None)
    curve.append({"step": step, **acc, "kl": kl_at.get(near, float("nan"))})
  return curve


def pairs_from_sft(
  sft_dir: str, prompts_path: str, out_path: str, seed: int, samples: int = 4
) -> dict:
  """`samples` samples (temperature 1) of the SFT model per training prompt, taken two at a
  time and labelled by the true answer; ties dropped."""
  from rlhf import tasks

  prompts = [r["prompt"] for r in read_jsonl(prompts_path)]
  drawn = [
    answers(sft_dir, prompts, chat=True, temperature=1.0, seed=samples * seed + k)[0]
    for k in range(samples)
  ]
  # A sample that is not a number (a stray role marker, say) is wrong, but its text is not
  # one the tokenizer reads back as written: such pairs are dropped and counted.
  number = lambda t: t.strip().isdigit()
  pairs, stats = [], {"pairs": 0, "ties_dropped": 0, "non_numeric_dropped": 0}
  for first, second in zip(drawn[0::2], drawn[1::2]):
    keep = [number(x) and number(y) for x, y in zip(first, second)]
    kept = [(p, x, y) for p, x, y, k in zip(prompts, first, second, keep) if k]
    got, counts = tasks.preference_pairs(*(list(col) for col in zip(*kept)))
    pairs += got
    stats["pairs"] += counts["pairs"]
    stats["ties_dropped"] += counts["ties_dropped"]
    stats["non_numeric_dropped"] += keep.count(False)
  tasks.write_jsonl(out_path, pairs)
  return stats


def last_row(workdir: str, split: str) -> dict:
  """The run's last logged row of `split` ("train" or "val"), or {}."""
  from train.metrics import read_metrics

  rows = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["split"] == split]
  return rows[-1] if rows else {}


def run(
  workdir: str,
  seed: int = 0,
  scale: float = 1.0,
  stages=STAGES,
  fresh: bool = True,
  configure=None,
) -> dict:
  """The whole road in `workdir`; returns the report (also written as report.json). With
  fresh=False an existing workdir is kept: a stage whose run finished resumes at its last step
  and does not train again. configure(stage, config), when given, edits each stage's config
  (its paths are set after it)."""
  from data import prepare
  from rlhf import tasks

  t_start = time.perf_counter()
  if fresh and os.path.exists(workdir):
    shutil.rmtree(workdir)
  os.makedirs(workdir, exist_ok=True)
  times: dict[str, float] = {}
  d = lambda name: os.path.join(workdir, name)

  t0 = time.perf_counter()
  files = tasks.write_files(d("task"), seed=seed)
  prepare.main(
    [
      f"--source={files['pretrain']}",
      f"--val_source={files['pretrain_val']}",
      "--tokenizer=char",
      f"--out={d('data')}",
    ]
  )
  times["tokenizer"] = time.perf_counter() - t0
  heldout = read_jsonl(files["heldout"])
  report = {"seed": seed, "scale": scale, "models": {}, "times_s": times}

  c = stage_config("pretrain", seed, scale, configure)
  c.data.path = d("data")
  run_stage("pretrain", c, d("pretrained"), times)
  report["models"]["pretrained"] = evaluate(d("pretrained"), heldout, chat=False, seed=seed)

  c = stage_config("sft", seed, scale, configure)
  c.data.path = files["sft"]
  c.train.init_from = d("pretrained")
  run_stage("sft", c, d("sft"), times)
  report["models"]["sft"] = evaluate(d("sft"), heldout, chat=True, seed=seed)

  t0 = time.perf_counter()
  report["pairs"] = pairs_from_sft(d("sft"), files["prompts"], d("task/pairs.jsonl"), seed)
  times["pairs"] = time.perf_counter() - t0

  if "rm" in stages:
    c = stage_config("rm", seed, scale, configure)
    c.data.path = d("task/pairs.jsonl")
    c.train.init_from = c.rlhf.norm_policy = d("sft")
    run_stage("rm", c, d("rm"), times)
    ev = last_row(d("rm"), "val")
    report["reward_model"] = {k: ev[k] for k in ("accuracy", "reward_gap") if k in ev}

  if "ppo" in stages:
    c = stage_config("ppo", seed, scale, configure)
    c.train.init_from = d("sft")
    c.rlhf.reward = d("rm")
    c.rlhf.prompts = files["prompts"]
    c.train.checkpoint_every = max(1, c.train.steps // 6)
    c.train.keep_checkpoints = 8
    run_stage("ppo", c, d("ppo"), times)
    report["models"]["ppo"] = evaluate(d("ppo"), heldout, chat=True, seed=seed)
    report["models"]["ppo"]["kl"] = last_row(d("ppo"), "train").get("kl")

  if "dpo" in stages:
    c = stage_config("dpo", seed, scale, configure)
    c.data.path = d("task/pairs.jsonl")
    c.train.init_from = d("sft")
    run_stage("dpo", c, d("dpo"), times)
    report["models"]["dpo"] = evaluate(d("dpo"), heldout, chat=True, seed=seed)

  if "grpo" in stages:
    c = stage_config("grpo", seed, scale, configure)
    c.train.init_from = d("sft")
    c.rlhf.prompts = files["prompts"]
    c.train.checkpoint_every = max(1, c.train.steps // 6)
    c.train.keep_checkpoints = 8
    run_stage("grpo", c, d("grpo"), times)
    report["models"]["grpo"] = evaluate(d("grpo"), heldout, chat=True, seed=seed)
    report["models"]["grpo"]["kl"] = last_row(d("grpo"), "train").get("kl")

  report["curves"] = {
    name: rl_curve(d(name), heldout, report["models"]["sft"])
    for name in ("ppo", "grpo")
    if name in stages
  }
  times["total"] = time.perf_counter() - t_start
  with open(d("report.json"), "w") as f:
    json.dump(report, f, indent=1)
  if report["curves"]:
    plot(report["curves"], d("rl.png"))
  return report


KL_LOGGED = {"ppo": "summed k1 per response", "grpo": "k3 per token"}


def plot(curves: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  for name, rows in curves.items():
    steps = [r["step"] for r in rows]
    ax1.plot(steps, [r["exact_match"] for r in rows], marker="o", label=f"{name} overall")
    ax1.plot(steps, [r["carry_exact_match"] for r in rows], marker="x", label=f"{name} carry")
    ax2.plot(steps, [r["kl"] for r in rows], marker="o", label=f"{name} ({KL_LOGGED[name]})")
  ax1.set(
    xlabel="RL iteration (0: the SFT model)",
    ylabel="held-out greedy exact match",
    ylim=(0, 1.02),
  )
  ax2.set(xlabel="RL iteration", ylabel="KL to the reference (as logged)")
  ax1.legend()
  ax2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def table(report: dict) -> str:
  rows = [
    "| model | exact match | carry cases | no carry | sampled (T=1) | sampled, carry | "
    "EOS rate | KL |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, m in report["models"].items():
    kl = m.get("kl")
    rows.append(
      f"| {name} | {m['exact_match']:.3f} | {m['carry_exact_match']:.3f} | "
      f"{m['no_carry_exact_match']:.3f} | {m['sampled_exact_match']:.3f} | "
      f"{m['sampled_carry_exact_match']:.3f} | {m['eos_rate']:.3f} | "
      f"{'' if kl is None else f'{kl:.3f}'} |"
    )
  lines = ["\n".join(rows)]
  if "reward_model" in report:
    rm = report["reward_model"]
    lines.append(f"reward model held-out pairwise accuracy: {rm.get('accuracy', float('nan')):.3f}")
  lines.append(
    f"preference pairs: {report['pairs']['pairs']} ({report['pairs']['ties_dropped']} ties dropped)"
  )
  lines.append(
    "wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["times_s"].items())
  )
  return "\n\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m rlhf.demo", description=__doc__)
  p.add_argument("--workdir", default="runs/addition")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's steps")
  p.add_argument(
    "--keep",
    action="store_true",
    help="keep an existing workdir: finished stages are not trained again",
  )
  args = p.parse_args(argv)
  # Both cores as two data-parallel CPU devices (faster than one here); before JAX starts.
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  report = run(args.workdir, args.seed, args.scale, fresh=not args.keep)
  print("\n" + table(report))
  print(f"\nwhere everything went ({os.path.abspath(args.workdir)}):")
  for name, what in (
    ("task/", "the task's JSONL files: equations, demonstrations, pairs, prompts, held out"),
    ("data/", "the character tokenizer and token shards of the equations"),
    ("pretrained/ sft/ rm/ ppo/ dpo/ grpo/", "each stage's workdir (checkpoints, metrics)"),
    ("report.json", "every figure above, and accuracy over RL iterations"),
    ("rl.png", "held-out accuracy and KL over RL iterations"),
  ):
    print(f"  {name:<38} {what}")
  print(f"\ntalk to a model: .venv/bin/python -m train.chat --workdir={args.workdir}/ppo")


if __name__ == "__main__":
  main()
