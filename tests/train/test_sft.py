"""Supervised fine-tuning: it learns a task with known answers, packing leaks nothing between
chats, and its checkpoints carry the chat template."""

import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import chat
from tests.conftest import log_softmax64
from tests.timing import timed
from train.stage import build_stage
from train.weights import load_for_inference

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def reversal_chats(path, n, seed, exclude=()):
  """{"prompt": word, "response": the word reversed}: random words of 3-6 letters."""
  rng, words = random.Random(seed), []
  while len(words) < n:
    w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    if w not in exclude and w not in words:
      words.append(w)
  with open(path, "w") as f:
    for w in words:
      f.write(json.dumps({"prompt": w, "response": w[::-1]}) + "\n")
  return words


def sft_config(train_path, val_path="", **train):
  from configs.experiments import sft_tiny_test

  c = sft_tiny_test.get_config()
  c.data.path, c.data.val_path = str(train_path), str(val_path)
  c.data.eval_replies = 0
  for k, v in train.items():
    c.train[k] = v
  return c


def exact_match(stage, words, params=None):
  """Greedy replies against the reversed words, compared in plain Python."""
  replies = stage.reply([[{"role": "user", "content": w}] for w in words], params)
  return float(np.mean([r == w[::-1] for r, w in zip(replies, words)]))


def test_sft_learns_to_reverse_words_from_scratch(tmp_path):
  """From random init to >= 90% greedy exact match on 64 held-out words, in under 2 minutes
  on CPU. Words are random letters, so no reply is memorised: it must reverse."""
  from train import loop

  train_words = reversal_chats(tmp_path / "train.jsonl", 4000, seed=0)
  held_out = reversal_chats(tmp_path / "val.jsonl", 64, seed=1, exclude=set(train_words))
  config = sft_config(tmp_path / "train.jsonl", tmp_path / "val.jsonl", steps=300)
  config.data.batch_size = 16
  config.opt.warmup_steps = 20
  before = build_stage(config, str(tmp_path / "init"))  # the run's initial weights (same seed)
  assert exact_match(before, held_out) < 0.1
  summary, seconds, budget = timed(lambda: loop.train(config, str(tmp_path / "run")), 120)
  # Read onto the stage's mesh, as a sharded evaluation would.
  mesh = before.mesh
  _, _, params, _ = load_for_inference(str(tmp_path / "run"), mesh=mesh.mesh, rules=mesh.rules)
  got = exact_match(before, held_out, params)
  assert got >= 0.9, f"held-out exact match {got:.2f} after SFT (val loss {summary['val_loss']})"
  assert seconds < budget, f"SFT took {seconds:.0f} s (budget {budget:.0f} s)"
  items = os.listdir(tmp_path / "run" / "checkpoints" / "300")
  assert {"chat_template", "tokenizer", "models", "host", "states"} <= set(items)


def test_packed_sft_loss_is_each_chat_scored_alone(tmp_path):
  """The held-out loss of packed rows (several chats a row) equals scoring each chat alone,
  on its assistant tokens and end markers, with a float64 NumPy log-softmax: a chat sees no
  other chat's tokens, and no token outside the mask is counted."""
  rng = random.Random(3)
  chats = []
  for k in range(14):
    messages = [{"role": "system", "content": "be brief"}] if k % 3 == 0 else []
    for _ in range(1 + k % 2):
      messages.append({"role": "user", "content": "".join(rng.choice(LETTERS) for _ in range(4))})
      messages.append({"role": "assistant", "content": rng.choice(["yes", "no", "maybe so"])})
    chats.append(messages)
  with open(tmp_path / "val.jsonl", "w") as f:
    for m in chats:
      f.write(json.dumps({"messages": m}) + "\n")
  reversal_chats(tmp_path / "train.jsonl", 40, seed=0)
  config = sft_config(tmp_path / "train.jsonl", tmp_path / "val.jsonl")
  stage = build_stage(config, str(tmp_path / "run"))
  assert len(stage.val_arrays["inputs"]) < len(chats), "chats should share rows"
  # Spread the logits (init std 0.02 leaves them near uniform).
  params = jax.tree.map(lambda x: 4 * x, stage.params)
  got = stage.evaluate(params)
  model = nnx.merge(stage.graphdef, jax.device_get(params))
  # Each chat alone, right-padded to one length so the forward compiles once: causal
  # attention keeps padding after a chat out of its logits.
  alone = jax.jit(lambda toks: model(toks))
  nll = count = 0.0
  for messages in chats:
    ids, mask = chat.render_chat(stage.tokenizer, messages)
    padded = np.zeros((1, 64), np.int32)
    padded[0, : len(ids) - 1] = ids[:-1]
    logits = np.asarray(alone(jnp.asarray(padded)))[0, : len(ids) - 1]
    logp = log_softmax64(logits)[np.arange(len(ids) - 1), ids[1:]]
    nll -= (logp * np.asarray(mask[1:])).sum()
    count += sum(mask[1:])
  assert got["tokens"] == count
  np.testing.assert_allclose(got["loss"], nll / count, rtol=1e-5)


def test_sft_config_errors_name_the_field(tmp_path):
  config = sft_config("")
  with pytest.raises(ValueError, match="data.path is empty"):
    build_stage(config, str(tmp_path))
  reversal_chats(tmp_path / "train.jsonl", 10, seed=0)
  config = sft_config(tmp_path / "train.jsonl")
  config.data.overflow = "wrap"
  with pytest.raises(ValueError, match=r"data.overflow='wrap'"):
    build_stage(config, str(tmp_path))
