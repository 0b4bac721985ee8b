"""LoRA fine-tuning through the one train step: only the adapters get gradients and optimizer
state, the base weights stay bitwise as they were, checkpoints hold the adapters alone, and a
run that resumes from one ends as a run that never stopped."""

import jax
import numpy as np

from model import lora
from tests.train.test_sft import reversal_chats, sft_config
from train import checkpoint as ckpt
from train.stage import build_stage

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def lora_config(tmp_path, **train):
  reversal_chats(tmp_path / "train.jsonl", 200, seed=0)
  c = sft_config(tmp_path / "train.jsonl", **train)
  c.model.lora_rank, c.model.lora_alpha, c.model.lora_targets = 4, 8.0, TARGETS
  c.model.lora_dropout = 0.1
  c.opt.total_steps = 4  # the schedule of the longest run, so that a shorter one resumes
  return c


def paths(tree) -> set[tuple]:
  return {
    tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p)
    for p, _ in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_only_adapters_train_and_the_base_stays_bitwise(tmp_path):
  stage = build_stage(lora_config(tmp_path), str(tmp_path / "run"))
  before = jax.device_get(stage.states["model"].params)
  adapters = paths(lora.split(before, lora.is_adapter)[0])
  assert adapters and all(p[-1] in ("lora_a", "lora_b") for p in adapters)
  # Optimizer moments exist for the adapters alone: one mu and one nu per adapter array.
  opt_leaves = jax.tree.leaves(stage.states["model"].opt_state)
  adapter_sizes = sorted(x.size for x in jax.tree.leaves(lora.split(before, lora.is_adapter)[0]))
  moments = sorted(x.size for x in opt_leaves if x.size > 1)
  assert moments == sorted(adapter_sizes * 2), "moments only for the adapters"
  for _ in range(3):
    for name, batch in stage.updates():
      stage.states[name], metrics = stage.steps[name](stage.states[name], batch)
  after = jax.device_get(stage.states["model"].params)
  trained, base = lora.split(after, lora.is_adapter)
  _, base_before = lora.split(before, lora.is_adapter)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(base_before)):
    np.testing.assert_array_equal(a, b)
  moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(lora.split(before, lora.is_adapter)[0]))]  # fmt: skip
  assert min(moved) > 0, "every adapter array trained (lora_b leaves zero)"
  assert np.isfinite(float(metrics["loss"]))


def test_checkpoints_hold_adapters_alone_and_resume_exactly(tmp_path):
  from train import loop

  straight = lora_config(tmp_path, steps=4, checkpoint_every=2)
  loop.train(straight, str(tmp_path / "straight"))
  cut = lora_config(tmp_path, steps=2, checkpoint_every=2)
  loop.train(cut, str(tmp_path / "cut"))
  loop.train(lora_config(tmp_path, steps=4, checkpoint_every=2), str(tmp_path / "cut"))

  def checksums(run):
    c = ckpt.Checkpointer(str(tmp_path / run / "checkpoints"), async_save=False)
    try:
      return c.restore_items(4, [ckpt.CHECKSUMS])[ckpt.CHECKSUMS]
    finally:
      c.close()

  saved = checksums("straight")
  params = {k for k in saved if ".params" in k}
  assert params and all("lora_a" in k or "lora_b" in k for k in params), sorted(params)[:4]
  assert checksums("cut") == saved, "the resumed run ends where the straight one does"
  model = build_stage(straight, str(tmp_path / "fresh")).states["model"].params
  assert len(params) == len(jax.tree.leaves(lora.split(model, lora.is_adapter)[0]))
