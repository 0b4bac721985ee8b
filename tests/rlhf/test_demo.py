"""`make demo`'s road (rlhf/demo.py), shortened: every stage runs through the loop on the
addition task's files, with a small model and a few steps each. What the report says is
checked against independent references: greedy answers decoded by full forwards without a KV
cache and scored with Python integers, pairs labelled by the true sums, every stage's
workdir and the plot."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data.chat import render_prompt
from model.transformer import Transformer
from rlhf import demo
from train import weights

SMALL = dict(d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=256)


def small(stage, c):
  if stage == "pretrain":
    c.model.update(SMALL)
    c.train.steps = 400  # enough for right and wrong answers, hence pairs
  if stage == "sft":
    c.train.steps = 100
  if stage in ("rm", "dpo"):  # a few dozen pairs: the held-out ones fill a batch of 4
    c.data.update(batch_size=8, eval_batch_size=4, val_fraction=0.1)
  c.mesh.devices = 1
  c.train.tensorboard = False


def greedy_by_full_forwards(workdir, prompts, steps=5):
  """Greedy completions: the whole sequence through the model at each step (no cache), the
  argmax appended; every rendered prompt has the same length, so no padding is needed."""
  cfg, _, params, tok = weights.load_for_inference(workdir)
  model = nnx.merge(
    nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))), params
  )
  forward = jax.jit(lambda ids: model(ids)[:, -1])
  ids = np.array([render_prompt(tok, [{"role": "user", "content": p}]) for p in prompts])
  done = np.zeros(len(prompts), bool)
  texts = [[] for _ in prompts]
  for _ in range(steps):
    nxt = np.asarray(jnp.argmax(forward(jnp.asarray(ids)), axis=-1))
    for i, t in enumerate(nxt):
      if not done[i]:
        if t == tok.end_id:
          done[i] = True
        else:
          texts[i].append(int(t))
    ids = np.concatenate([ids, nxt[:, None]], axis=1)
  return [tok.decode(t) for t in texts], done


def test_the_shortened_road_reports_what_its_models_do(tmp_path):
  wd = str(tmp_path / "addition")
  report = demo.run(wd, seed=1, scale=0.02, configure=small)
  for name in ("pretrained", "sft", "rm", "ppo", "dpo", "grpo", "task", "data"):
    assert os.path.isdir(os.path.join(wd, name)), name
  assert set(report["models"]) == {"pretrained", "sft", "ppo", "dpo", "grpo"}
  assert set(report["times_s"]) >= {"pretrain", "sft", "pairs", "rm", "ppo", "dpo", "grpo", "total"}
  with open(os.path.join(wd, "report.json")) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  assert os.path.getsize(os.path.join(wd, "rl.png")) > 0

  # Held-out accuracy of the fine-tuned and the RL models, by another decoder and integers.
  with open(os.path.join(wd, "task", "heldout.jsonl")) as f:
    held = [json.loads(line)["prompt"] for line in f]
  sums = [int(p[:2]) + int(p[3:5]) for p in held]
  carry = np.array([int(p[1]) + int(p[4]) >= 10 for p in held])
  for name in ("sft", "ppo", "grpo"):
    texts, ended = greedy_by_full_forwards(os.path.join(wd, name), held)
    right = np.array([t.strip() == str(s) for t, s in zip(texts, sums)])
    got = report["models"][name]
    assert got["exact_match"] == right.mean(), name
    assert got["carry_exact_match"] == right[carry].mean(), name
    assert got["eos_rate"] == ended.mean(), name
  # The curves start at the SFT model and read every kept RL checkpoint, the last one the
  # model in the table.
  for name in ("ppo", "grpo"):
    curve = report["curves"][name]
    assert [r["step"] for r in curve] == [0] + demo.checkpoint_steps(os.path.join(wd, name))
    assert curve[0]["exact_match"] == report["models"]["sft"]["exact_match"]
    assert curve[0]["kl"] == 0.0
    assert curve[-1]["exact_match"] == report["models"][name]["exact_match"]
    # The table's KL: the last logged training KL (PPO's summed k1, GRPO's k3), read here
    # straight from the run's metrics file.
    with open(os.path.join(wd, name, "metrics.jsonl")) as f:
      kls = [r["kl"] for r in map(json.loads, f) if r["split"] == "train" and "kl" in r]
    assert kls and report["models"][name]["kl"] == kls[-1], name

  # Pairs: the chosen answer is the true sum and the rejected one is not.
  with open(os.path.join(wd, "task", "pairs.jsonl")) as f:
    pairs = [json.loads(line) for line in f]
  assert len(pairs) == report["pairs"]["pairs"] > 0
  for p in pairs:
    s = int(p["prompt"][:2]) + int(p["prompt"][3:5])
    assert p["chosen"] == str(s) and p["rejected"] != str(s)
  assert 0.0 <= report["reward_model"]["accuracy"] <= 1.0
  assert "| ppo |" in demo.table(report)
