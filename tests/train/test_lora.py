"""LoRA fine-tuning through the one train step: only the adapters get gradients and optimizer
state, the base weights stay bitwise as they were, checkpoints hold the adapters alone, and a
run that resumes from one ends as a run that never stopped."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from model import lora
from model.transformer import Transformer
from tests.train.test_sft import reversal_chats, sft_config
from train import checkpoint as ckpt
from train import step as steplib
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


def write_pairs(path, n, seed):
  """Preference pairs over letters: the reversed word is chosen, the word itself rejected."""
  words = reversal_chats(path.with_suffix(".chats"), n, seed)
  with open(path, "w") as f:
    for w in words:
      f.write(json.dumps({"prompt": w, "chosen": w[::-1], "rejected": w}) + "\n")


def test_a_lora_run_loads_merged_and_is_a_base_for_the_next_stage(tmp_path):
  """A LoRA SFT run on a base run: loaded for inference, its adapters come folded into the
  base weights (its own train.init_from) and the logits equal the adapted model's. A DPO run
  with LoRA on top of it scores its reference with the adapters off: exactly the logprobs of
  a DPO run without LoRA whose reference is loaded separately."""
  from configs.experiments import dpo_tiny_test
  from train import loop
  from train.weights import load_for_inference

  base = lora_config(tmp_path, steps=2, checkpoint_every=2)
  base.model.lora_rank = 0
  loop.train(base, str(tmp_path / "base"))
  adapted_cfg = lora_config(tmp_path, steps=3, checkpoint_every=3, init_from=str(tmp_path / "base"))
  loop.train(adapted_cfg, str(tmp_path / "lora"))

  cfg, _, merged, _ = load_for_inference(str(tmp_path / "lora"))
  assert cfg.lora_rank == 0 and not lora.split(merged, lora.is_adapter)[0]
  stage = build_stage(adapted_cfg, str(tmp_path / "again"))  # the base, adapters at zero
  lora_states = {"model": lora.trains}
  saved = steplib.saved_part(stage.states, lora_states)
  c = ckpt.Checkpointer(str(tmp_path / "lora" / "checkpoints"), async_save=False)
  shardings = steplib.saved_part(stage.state_shardings, lora_states)
  states, _ = c.restore(3, ckpt.abstract_like(saved, shardings))
  c.close()
  params = steplib.restored(stage.states, states, lora_states)["model"].params
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 20, (2, 24)))
  adapted = nnx.merge(stage.graphdef, jax.device_get(params))(tokens)
  plain = nnx.merge(nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[0], merged)(tokens)
  base_params = jax.device_get(stage.states["model"].params)
  assert float(jnp.abs(adapted - nnx.merge(stage.graphdef, base_params)(tokens)).max()) > 1e-4
  np.testing.assert_allclose(plain, adapted, rtol=1e-5, atol=1e-5)
  # Exported for transformers, the folded weights come back as they were.
  from model import convert, hf_files
  from train.export import export

  export(str(tmp_path / "lora"), str(tmp_path / "hf"))
  _, back = convert.hf_to_params(*hf_files.read_hf(str(tmp_path / "hf")))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(jax.device_get(merged))):
    np.testing.assert_array_equal(a, b)

  write_pairs(tmp_path / "pairs.jsonl", 24, seed=2)
  refs = []
  for rank in (4, 0):
    d = dpo_tiny_test.get_config()
    d.data.path, d.data.val_fraction = str(tmp_path / "pairs.jsonl"), 0.0
    d.model = ml_collections.ConfigDict({"lora_rank": rank, "lora_targets": TARGETS})
    d.train.init_from = str(tmp_path / "lora")
    dpo = build_stage(d, str(tmp_path / f"dpo{rank}"))
    refs.append((dpo.train_arrays["ref_chosen"], dpo.train_arrays["ref_rejected"]))
  np.testing.assert_array_equal(refs[0][0], refs[1][0])
  np.testing.assert_array_equal(refs[0][1], refs[1][1])


def test_ppo_reference_is_the_base_with_adapters_off(tmp_path):
  """After two PPO iterations with LoRA (adapters no longer zero), the rollout's reference
  logprobs equal those of the base loaded separately, bitwise, and differ from the policy's."""
  from rlhf import score
  from tests.rlhf.test_ppo import ppo_config, run_iteration
  from train import loop, weights
  from train import stage as stagelib

  base = lora_config(tmp_path, steps=2, checkpoint_every=2)
  base.model.lora_rank = 0
  loop.train(base, str(tmp_path / "base"))
  c = ppo_config(tmp_path, "tests.rlhf.test_ppo:letters_reward", response_len=4)
  c.model = ml_collections.ConfigDict({"lora_rank": 4, "lora_targets": TARGETS})
  c.train.init_from = str(tmp_path / "base")
  c.opt.lr = 1e-2
  stage = build_stage(c, str(tmp_path / "ppo"))
  assert stage.ref_is_base and stage._ref_params is None, "no second copy of the model"
  run_iteration(stage)
  run_iteration(stage)
  _, full = stage.last
  adapters = lora.split(jax.device_get(stage.states["policy"].params), lora.is_adapter)[0]
  assert max(float(np.abs(b).max()) for b in jax.tree.leaves(adapters)) > 0
  source = weights.resolve(str(tmp_path / "base"))
  graphdef, ref, _ = stagelib.frozen_params(
    "lm", stage.model_cfg.replace(lora_rank=0), stage.mesh, source
  )
  mesh = stage.mesh
  alone = score.jit_forward({"ref": graphdef}, mesh.mesh, mesh.rules, stage.rl.temperature, False)
  want = alone(None, ref, None, None, full)["ref_logprobs"]
  got = stage.forward(None, stage.ref_params, None, None, full)["ref_logprobs"]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  mask = np.asarray(full["response_mask"]) > 0
  assert float(np.abs(np.asarray(full["old_logprobs"]) - np.asarray(want))[mask].max()) > 1e-4


def stage_with_lora(kind, tmp_path):
  """A stage of `kind` (from scratch, as its tests build it) with rank-4 adapters."""
  from tests.rlhf.test_ppo import ppo_config
  from tests.rlhf.test_reward import all_sum_pairs, rm_config, sum_pairs

  if kind == "reward":
    sum_pairs(tmp_path / "pairs.jsonl", all_sum_pairs(seed=0)[:64])
    c = rm_config(tmp_path / "pairs.jsonl")
  else:
    c = ppo_config(tmp_path, "tests.rlhf.test_ppo:letters_reward", response_len=3, critic=kind)
  c.model.lora_rank, c.model.lora_targets = 4, TARGETS
  c.opt.lr, c.opt.warmup_steps = 1e-2, 0
  return build_stage(c, str(tmp_path / "run"))


@pytest.mark.parametrize("kind", ["reward", "separate"])
def test_every_model_of_a_stage_trains_its_adapters_alone(tmp_path, kind):
  """The reward model, and PPO's policy and separate critic (GRPO's policy takes PPO's
  path): after an iteration every base weight is bitwise as before, and the adapters (with a
  scalar model's head) moved."""
  stage = stage_with_lora(kind, tmp_path)
  before = {n: jax.device_get(s.params) for n, s in stage.states.items()}
  for name, batch in stage.updates():
    stage.states[name], _ = stage.steps[name](stage.states[name], batch)
  for name, state in stage.states.items():
    trained, base = lora.split(jax.device_get(state.params), lora.trains)
    trained_before, base_before = lora.split(before[name], lora.trains)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(base_before)):
      np.testing.assert_array_equal(a, b)
    moved = [bool(np.any(a != b)) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(trained_before))]  # fmt: skip
    assert any(moved) and len(moved) >= 2 * len(TARGETS), (name, moved)
    if "head" in trained:  # a scalar model's fresh head trains beside its adapters
      heads = zip(jax.tree.leaves(trained["head"]), jax.tree.leaves(trained_before["head"]))
      assert any(bool(np.any(a != b)) for a, b in heads), name
