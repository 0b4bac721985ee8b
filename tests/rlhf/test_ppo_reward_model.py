"""PPO and GRPO against a reward model's workdir: each response is scored by the reward model at its
last real token and normalised by the checkpoint's gain and bias; a scalar checkpoint loads
for inference onto a mesh."""

import dataclasses
import json

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from data.tokenizer import CharTokenizer, tokenizer_to_json
from model.config import preset
from rlhf import reward
from rlhf.ppo import final_scores
from train import checkpoint as ckpt
from train import weights
from train.stage import build_stage

LETTERS = "abcdefgh"
NORM = {"gain": 2.0, "bias": -0.5}


def reward_workdir(path, tok, cfg):
  """A reward model's workdir as the reward stage writes one: the 'reward' state, its models
  item and a reward_norm item."""
  params = nnx.to_pure_dict(nnx.state(weights.make_model("scalar", cfg, 3)))
  saver = ckpt.Checkpointer(str(path / "checkpoints"), async_save=False)
  items = {
    "config": {"model": {}},
    "tokenizer": tokenizer_to_json(tok),
    "models": weights.models_item({"reward": ("scalar", cfg)}),
    "reward_norm": NORM,
  }
  saver.save(1, {"reward": {"params": jax.device_get(params)}}, items)
  saver.close()
  return params


@pytest.mark.parametrize("stage_name", ["ppo", "grpo"])
def test_scores_come_from_the_reward_model_at_the_last_real_token_normalised(tmp_path, stage_name):
  """The iteration's scores equal reward.score of each whole sequence run alone on one device,
  under the checkpoint's gain and bias, less the no-EOS penalty where a response never ended,
  for PPO and for GRPO (8 prompts x 2 samples). PPO's separate critic starts as the reward
  model with its normalisation folded into the head (its values at the last token are the
  normalised scores), and learns on its own schedule: critic_lr over opt.lr at every step."""
  from configs import base

  tok = CharTokenizer.from_text(LETTERS)
  cfg = preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64, init_std=0.3)
  rm_params = reward_workdir(tmp_path / "rm", tok, cfg)
  with open(tmp_path / "prompts.jsonl", "w") as f:
    for i in range(16):
      f.write(json.dumps({"prompt": LETTERS[i % 8 :] + LETTERS[: i % 8]}) + "\n")
  c = base.get_config()
  c.stage = f"rlhf.{stage_name}"
  c.model = ml_collections.ConfigDict(dataclasses.asdict(cfg))
  c.rlhf = ml_collections.ConfigDict(
    dict(
      prompts=str(tmp_path / "prompts.jsonl"),
      reward=str(tmp_path / "rm"),
      response_len=5,
      max_prompt_len=16,
      missing_eos_penalty=0.25,
    )
  )
  if stage_name == "ppo":
    c.rlhf.update(batch_size=16, minibatches=2, epochs=1, critic_lr=7 * c.opt.lr)
  else:
    c.rlhf.update(batch_size=8, group_size=2)
  c.train.update(progress=False, tensorboard=False)
  stage = build_stage(c, str(tmp_path / "run"))
  assert stage.norm["gain"] == NORM["gain"] and stage.norm["bias"] == NORM["bias"]
  if stage_name == "ppo":
    critic0 = jax.device_get(stage.states["critic"].params)
    jax.tree.map(
      np.testing.assert_array_equal, critic0["trunk"], jax.device_get(rm_params["trunk"])
    )
  lrs = {}
  for name, batch in stage.updates():  # one iteration, as run_iteration runs it
    stage.states[name], m = stage.steps[name](stage.states[name], batch)
    lrs.setdefault(name, float(m["lr"]))
  out, full = stage.last
  graphdef = nnx.graphdef(weights.make_model("scalar", cfg, 0))
  raw, values = [], []
  for tokens, mask in zip(out.tokens_BxL, out.mask_BxL):
    real = mask > 0
    alone = tokens[real][None]  # the row's real tokens only: no padding at all
    raw.append(float(reward.score(graphdef, rm_params, alone, np.ones_like(alone))[0]))
    if stage_name == "ppo":
      values.append(float(reward.score(graphdef, critic0, alone, np.ones_like(alone))[0]))
  if stage_name == "ppo":
    np.testing.assert_allclose(values, NORM["gain"] * np.asarray(raw) + NORM["bias"], rtol=1e-5)
    assert lrs["policy"] > 0
    np.testing.assert_allclose(lrs["critic"], 7 * lrs["policy"], rtol=1e-6)
  want = final_scores(np.asarray(raw), NORM, out.eos_B, 0.25)
  got_mean = stage.iteration_metrics()["score"]
  np.testing.assert_allclose(got_mean, want.mean(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    stage.iteration_metrics()["score_raw"], np.mean(raw), rtol=1e-5, atol=1e-5
  )
  if stage_name == "grpo":  # each episode's: its group's advantages from these scores
    pairs = want.reshape(-1, 2)
    adv = (pairs - pairs.mean(1, keepdims=True)) / (pairs.std(1, ddof=1, keepdims=True) + 1e-4)
    got = np.asarray(jax.device_get(full["advantages"]))[..., 0].reshape(-1)
    np.testing.assert_allclose(got, adv.reshape(-1), rtol=1e-4, atol=1e-4)


def test_a_scalar_checkpoint_loads_for_inference_sharded_on_a_mesh(tmp_path):
  """load_for_inference reads a reward model's parameters straight onto an FSDP mesh of 8:
  each device holds its shard, and the values are the saved ones."""
  from train import partitioning

  tok = CharTokenizer.from_text(LETTERS)
  cfg = preset("tiny", vocab_size=16, d_model=64, max_seq_len=64)
  saved = reward_workdir(tmp_path / "rm", tok, cfg)
  layout = partitioning.load_layout("fsdp", {})
  mesh = partitioning.make_mesh(layout)
  got_cfg, _, params, got_tok = weights.load_for_inference(
    str(tmp_path / "rm"), state="reward", mesh=mesh, rules=layout.rules
  )
  assert got_cfg == cfg and got_tok.chars == tok.chars
  assert set(params) == {"trunk", "head"}
  for leaf in jax.tree.leaves(params):
    assert len(leaf.sharding.device_set) == 8
  table = params["trunk"]["embed"]["table_VxD"]
  assert table.addressable_shards[0].data.size == table.size // 8, "split 8 ways, not copied"
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(saved))
