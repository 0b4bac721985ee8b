"""A LoRA run's base weights are those its first start read, whatever happens after: the run
they came from trains on, the run is resumed or read from another directory, or the base's
step is deleted (a clear error). Frozen models built from a LoRA run or a classifier take
neither adapters nor classes from it."""

import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from model import lora
from model.config import ModelConfig
from tests.train.test_lora import TARGETS, lora_config
from train import checkpoint as ckpt
from train import loop, weights
from train.sources import Source, pinned


def checksums(run, step):
  c = ckpt.Checkpointer(os.path.join(run, "checkpoints"), async_save=False)
  try:
    return c.restore_items(step, [ckpt.CHECKSUMS, "models"])
  finally:
    c.close()


def base_config(tmp_path, steps):
  c = lora_config(tmp_path, steps=steps, checkpoint_every=2)
  c.model.lora_rank = 0
  return c


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A plain SFT run of 2 steps: the base the LoRA runs here start from."""
  where = tmp_path_factory.mktemp("base")
  loop.train(base_config(where, 2), str(where / "base"))
  return where / "base"


def test_a_lora_run_keeps_the_base_its_first_start_read(tmp_path, monkeypatch, base_run):
  monkeypatch.chdir(tmp_path)
  shutil.copytree(base_run, "base")  # trained on below
  # Given relatively and as 'the latest step': step 2 is what the run records and keeps.
  loop.train(lora_config(tmp_path, steps=2, checkpoint_every=2, init_from="base"), "lora")
  _, _, merged, _ = weights.load_for_inference("lora")
  ref = checksums("lora", 2)["models"]["model"]["base"]
  assert (ref["path"], ref["step"], ref["given"]) == (str(tmp_path / "base"), 2, "base")

  loop.train(base_config(base_run.parent, 4), "base")  # trains on: step 4 is its latest
  monkeypatch.chdir(tmp_path / "base")  # read from elsewhere, the relative path means nothing
  _, _, again, _ = weights.load_for_inference(str(tmp_path / "lora"))
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Sanity: the latest base differs from the one recorded, so reading it would have shown.
  _, _, latest, _ = weights.load_for_inference(str(tmp_path / "base"))
  _, _, first, _ = weights.load_for_inference(str(tmp_path / "base"), 2)
  assert any(bool(np.any(a != b)) for a, b in zip(jax.tree.leaves(latest), jax.tree.leaves(first)))

  # Resumed (from the first directory), it trains on the base it started from: it ends where a
  # straight run from step 2 of the base ends.
  monkeypatch.chdir(tmp_path)
  loop.train(lora_config(tmp_path, steps=4, checkpoint_every=2, init_from="base"), "lora")
  straight = lora_config(tmp_path, steps=4, checkpoint_every=2, init_from="base", init_step=2)
  loop.train(straight, "straight")
  assert checksums("lora", 4)[ckpt.CHECKSUMS] == checksums("straight", 4)[ckpt.CHECKSUMS]
  assert checksums("lora", 4)["models"]["model"]["base"]["step"] == 2

  shutil.rmtree(tmp_path / "base" / "checkpoints" / "2")
  with pytest.raises(FileNotFoundError, match=r"has no step 2"):
    weights.load_for_inference("lora")
  with pytest.raises(FileNotFoundError, match=r"started from step 2 of .*base.* Restore"):
    loop.train(lora_config(tmp_path, steps=6, checkpoint_every=2, init_from="base"), "lora")


def test_run_fields_come_from_the_run_not_the_weights():
  """Adapters and a classifier's classes belong to the run that sets them: a stage on a LoRA
  classifier's weights is plain with one output unless its own config says otherwise."""
  source = Source("workdir", "x", 1, "model", "scalar", ModelConfig(lora_rank=4, num_classes=3), {})
  cfg = weights.model_config({}, source)
  assert (cfg.lora_rank, cfg.num_classes) == (0, 0)
  cfg = weights.model_config({"lora_rank": 8, "num_classes": 2}, source)
  assert (cfg.lora_rank, cfg.num_classes) == (8, 2)


def test_a_lora_reward_model_is_frozen_plain_and_scores_as_loaded(tmp_path, base_run):
  """PPO on a reward model trained with LoRA: the frozen reward model holds no adapters and
  scores exactly as the reward run's merged model, loaded for inference; the critic started
  from it records the reward run as its base."""
  from flax import nnx

  from rlhf import reward
  from tests.rlhf.test_ppo import ppo_config
  from tests.rlhf.test_reward import rm_config
  from tests.train.test_lora import write_pairs
  from train.stage import build_stage

  write_pairs(tmp_path / "pairs.jsonl", 32, seed=2)
  rm = rm_config(tmp_path / "pairs.jsonl", steps=2, checkpoint_every=2)
  rm.train.init_from = str(base_run)
  rm.model = ml_collections.ConfigDict({"lora_rank": 4, "lora_targets": TARGETS})
  rm.opt.lr = 1e-2
  loop.train(rm, str(tmp_path / "rm"))

  c = ppo_config(tmp_path, str(tmp_path / "rm"), response_len=3, critic="separate")
  c.train.init_from = str(base_run)
  c.model = ml_collections.ConfigDict({"lora_rank": 4, "lora_targets": TARGETS})
  with pinned(None) as record:
    stage = build_stage(c, str(tmp_path / "ppo"))
  models = loop.checkpoint_items(stage, c, None, record)["models"]  # what its checkpoints carry
  assert models["policy"]["base"]["path"] == str(base_run)
  assert models["critic"]["base"]["path"] == str(tmp_path / "rm"), "the critic's base: the RM"
  assert not lora.split(stage.reward_params, lora.is_adapter)[0], "no adapters on a frozen model"
  cfg, _, merged, _ = weights.load_for_inference(str(tmp_path / "rm"), state="reward")
  graphdef = nnx.split(weights.make_model("scalar", cfg, 0))[0]
  tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, (4, 12))
  mask = np.ones_like(tokens)
  got = reward.score(stage.graphdefs["reward"], jax.device_get(stage.reward_params), tokens, mask)
  want = reward.score(graphdef, merged, tokens, mask)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
