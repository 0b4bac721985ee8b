"""Reward model: the Bradley-Terry loss against hand-computed values, the score at the last real
token, one concatenated forward, learning a decidable preference, over-long pairs, and the
normalisation stored with each checkpoint."""

import json
import math
import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from data import chat
from data.sources import Preference
from data.tokenizer import CharTokenizer
from model.config import preset
from model.sampling import Sampler, SamplingConfig, left_pad
from model.transformer import ScalarModel
from rlhf import reward
from tests.timing import timed
from train import checkpoint as ckpt
from train.stage import build_stage
from train.weights import load_for_inference


def _softplus(x: float) -> float:
  """-log sigmoid(-x), in plain Python."""
  return math.log1p(math.exp(x))


def test_bradley_terry_matches_hand_computed_values_and_gradient_signs():
  """-log sigmoid(r_c - r_r - m) on small arrays with margins; the gradient raises the chosen
  reward, lowers the rejected one, and a larger margin costs more."""
  r_c = jnp.array([2.0, 0.0, -1.0, 0.5])
  r_r = jnp.array([1.0, 0.0, 1.0, 0.5])
  m = jnp.array([0.0, 0.0, 0.5, -1.0])
  # d = r_c - r_r - m = [1, 0, -2.5, 1]; log(1 + e^-1), log 2, log(1 + e^2.5), log(1 + e^-1).
  want = [0.31326168751822286, 0.6931471805599453, 2.578889734292559, 0.31326168751822286]
  np.testing.assert_allclose(reward.bradley_terry(r_c, r_r, m), want, rtol=1e-6)
  g_c, g_r, g_m = jax.grad(lambda *a: reward.bradley_terry(*a).sum(), argnums=(0, 1, 2))(
    r_c, r_r, m
  )
  sigmoid_neg_d = [1 / (1 + math.exp(d)) for d in (1.0, 0.0, -2.5, 1.0)]
  np.testing.assert_allclose(g_c, [-s for s in sigmoid_neg_d], rtol=1e-6)
  np.testing.assert_allclose(g_r, sigmoid_neg_d, rtol=1e-6)
  np.testing.assert_allclose(g_m, sigmoid_neg_d, rtol=1e-6)
  assert (g_c < 0).all() and (g_r > 0).all() and (g_m > 0).all()


def test_reward_loss_sums_over_pairs_and_skips_fill_rows():
  """reward_loss with a stand-in model whose value at a token is its id: the loss, pair count
  and per-pair sums against plain Python; all-pad rows (an evaluation's fill) count nothing."""
  rows = {  # pair -> (chosen ids, rejected ids, margin); pad id 7 is also a real id
    0: ([1, 2, 5], [1, 2, 3, 4], 0.0),
    1: ([1, 9], [1, 7, 7, 2], 0.5),
    2: ([1, 3, 7, 6], [1, 8], -1.0),
  }
  batch = {k: np.zeros((4, 6), np.int32) for k in reward.RM_KEYS if k != "margin"}
  batch["margin"] = np.zeros(4, np.float32)
  for i, (chosen, rejected, margin) in rows.items():
    for side, ids in (("chosen", chosen), ("rejected", rejected)):
      batch[f"{side}_inputs"][i] = ids + [7] * (6 - len(ids))
      batch[f"{side}_segment_ids"][i, : len(ids)] = 1
      batch[f"{side}_positions"][i, : len(ids)] = range(len(ids))
    batch["margin"][i] = margin
  calls = []

  def model(tokens, positions, segment_ids, dropout_rng=None):
    calls.append(tokens.shape)
    return tokens.astype(jnp.float32)

  loss_sum, count, sums = reward.reward_loss(model, jax.tree.map(jnp.asarray, batch))
  assert calls == [(8, 6)], "chosen and rejected go through one forward of 2B rows"
  gaps = [c[-1] - r[-1] for c, r, _ in rows.values()]  # 5-4, 9-2, 6-8
  assert count == 3
  np.testing.assert_allclose(
    loss_sum, sum(_softplus(-(g - m)) for g, (*_, m) in zip(gaps, rows.values())), rtol=1e-6
  )
  assert sums["accuracy"] == 2 and sums["reward_gap"] == sum(gaps)
  assert sums["chosen_reward"] == 5 + 9 + 6 and sums["rejected_reward"] == 4 + 2 + 8


def jitted(model, fn=lambda model, *args: model(*args)):
  """fn(model, *args) jitted with the model's parameters as an argument: eager forwards of
  even the tiny model take over a second on CPU."""
  graphdef, params = nnx.split(model)
  f = jax.jit(lambda p, *args: fn(nnx.merge(graphdef, p), *args))
  return lambda *args: f(params, *args)


def last_value_alone(model):
  """ids -> the model's value at the last of them, the sequence run alone (no padding, no
  mask): the reference every score is held to."""
  forward = jitted(model)
  return lambda ids: float(forward(jnp.asarray([ids], jnp.int32))[0, -1])


def _tiny_scalar_model(seed=0, vocab=32):
  # init std 0.1: values then differ visibly from position to position.
  return ScalarModel(preset("tiny", vocab_size=vocab, init_std=0.1), rngs=nnx.Rngs(seed))


def test_score_reads_the_last_real_token_whatever_the_pad_id():
  """Rows of different lengths, right-padded, or left-padded (a prompt) too: each score is the
  value at the row's last real token (plain-Python index over the mask), equal to the row
  scored alone; padding with an id that is also a real token (here the end id 9) changes
  nothing."""
  model = _tiny_scalar_model()
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  seqs = [[1, 4, 5, 9], [1, 3, 9], [1, 2, 2, 6, 8, 7, 9], [1, 9]]
  alone = [last_value_alone(model)(s) for s in seqs]
  score = jax.jit(reward.score, static_argnums=0)
  for left in (0, 3):
    for pad in (0, 9, 31):
      tokens = np.full((len(seqs), 10), pad, np.int32)
      mask = np.zeros((len(seqs), 10), np.int32)
      for i, s in enumerate(seqs):
        tokens[i, left : left + len(s)], mask[i, left : left + len(s)] = s, 1
      last = [max(j for j in range(10) if mask[i, j]) for i in range(len(seqs))]
      assert [tokens[i, j] for i, j in enumerate(last)] == [9] * len(seqs)
      got = score(graphdef, params, tokens, mask)
      np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-6, err_msg=f"{left=} {pad=}")
      if left == 0:  # with explicit positions the same
        positions = np.where(mask > 0, np.arange(10), 0)
        again = score(graphdef, params, tokens, mask, positions)
        np.testing.assert_allclose(again, alone, rtol=1e-5, atol=1e-6)
  # The scores differ from the values at any pad position: reading a pad would show.
  values = np.asarray(jitted(model)(tokens, None, mask))
  for i in range(len(seqs)):
    pads = values[i][mask[i] == 0]
    assert not np.isclose(pads, alone[i], atol=1e-4).any()


def _pairs_tokenizer():
  pairs = [
    Preference([{"role": "user", "content": "2+2="}], "4", "5"),
    Preference([{"role": "user", "content": "7+8="}], "15", "6", margin=1.0),
    Preference([{"role": "user", "content": "1+1="}], "2", "11"),
    Preference([{"role": "user", "content": "9+0="}], "9", "90", margin=-0.5),
  ]
  return pairs, CharTokenizer.from_text("0123456789+=")


def test_one_concatenated_forward_equals_two_separate_forwards():
  """pair_rewards (chosen and rejected stacked into 2B rows, one model call) equals running
  the chosen rows and the rejected rows through the model apart, each read at its last real
  token found in plain Python, which is <|end|>."""
  pairs, tok = _pairs_tokenizer()
  arrays, _ = chat.pack_preferences(pairs, tok, seq_len=12, shift=False)
  model = _tiny_scalar_model(seed=1, vocab=tok.vocab_size)
  r_c, r_r = jitted(model, reward.pair_rewards)(arrays)
  forward = jitted(model)
  for side, got in (("chosen", r_c), ("rejected", r_r)):
    values = np.asarray(
      forward(arrays[f"{side}_inputs"], arrays[f"{side}_positions"], arrays[f"{side}_segment_ids"])
    )
    want = []
    for i, seg in enumerate(arrays[f"{side}_segment_ids"].tolist()):
      last = max(j for j, s in enumerate(seg) if s > 0)
      assert arrays[f"{side}_inputs"][i, last] == tok.end_id
      want.append(values[i, last])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def sum_pairs(path, pairs):
  """{"prompt": "a+b=", "chosen": the sum, "rejected": another number 0..18} per line."""
  with open(path, "w") as f:
    for a, b, wrong in pairs:
      f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong)}))
      f.write("\n")


def all_sum_pairs(seed):
  """Every single-digit sum against every wrong answer in 0..18 (1,800 pairs), shuffled."""
  pairs = [(a, b, w) for a in range(10) for b in range(10) for w in range(19) if w != a + b]
  random.Random(seed).shuffle(pairs)
  return pairs


def rm_config(path, val_path="", **train):
  from configs.experiments import rm_tiny_test

  c = rm_tiny_test.get_config()
  c.data.path, c.data.val_path = str(path), str(val_path)
  for k, v in train.items():
    c.train[k] = v
  return c


def test_reward_model_learns_which_sum_is_right(tmp_path):
  """From scratch, a reward model learns to prefer the right sum of two digits over any other
  number: held-out pairwise accuracy >= 95% on 200 pairs in about 30 s on CPU. Answers
  alone decide at most ~70% (the best response-only scorer, computed below), so it must read
  the prompt. The accuracy is recomputed here from the checkpoint, each sequence scored alone."""
  from train import loop

  pairs = all_sum_pairs(seed=0)
  train, held_out = pairs[200:], pairs[:200]
  sum_pairs(tmp_path / "train.jsonl", train)
  sum_pairs(tmp_path / "val.jsonl", held_out)
  # The best scorer that sees only the answer: how often it was chosen vs rejected in training.
  seen = {}
  for a, b, w in train:
    seen.setdefault(a + b, [0, 0])[0] += 1
    seen.setdefault(w, [0, 0])[1] += 1
  odds = {n: (c + 1) / (r + 1) for n, (c, r) in seen.items()}
  answer_only = np.mean([odds[a + b] > odds[w] for a, b, w in held_out])
  assert answer_only < 0.75, answer_only

  config = rm_config(
    tmp_path / "train.jsonl",
    tmp_path / "val.jsonl",
    steps=1000,
    eval_batches=0,
    log_every=100,
    checkpoint_every=0,  # only the last step's
  )
  # A pair is at most 11 tokens: rows of 16 let a batch of 64 pairs cost what 32 would at 32.
  config.data.seq_len, config.data.batch_size, config.data.eval_batch_size = 16, 64, 40
  config.opt.warmup_steps = 20
  summary, seconds, budget = timed(lambda: loop.train(config, str(tmp_path / "run")), 120)
  val = summary["val"]
  assert val["pairs"] == 200
  assert val["accuracy"] >= 0.95, f"held-out pairwise accuracy {val['accuracy']:.3f}: {val}"
  assert val["reward_gap"] > 0
  assert seconds < budget, f"reward model training took {seconds:.0f} s (budget {budget:.0f} s)"

  cfg, _, params, tok = load_for_inference(str(tmp_path / "run"))
  one = last_value_alone(nnx.merge(nnx.graphdef(ScalarModel(cfg, rngs=nnx.Rngs(0))), params))
  prompt = lambda a, b: chat.render_prompt(tok, [{"role": "user", "content": f"{a}+{b}="}])
  right = [
    one(prompt(a, b) + tok.encode(str(a + b)) + [tok.end_id])
    > one(prompt(a, b) + tok.encode(str(w)) + [tok.end_id])
    for a, b, w in held_out
  ]
  # Sums in another order (one row alone, one device) may flip a near-tie: one pair at most.
  assert abs(np.mean(right) - val["accuracy"]) <= 1 / 200, (np.mean(right), val["accuracy"])
  print(
    f"held-out accuracy {val['accuracy']:.3f} in {seconds:.1f} s ({summary['final_step']} steps)"
  )

  items = ckpt.Checkpointer(str(tmp_path / "run" / "checkpoints")).restore_items(
    1000, ["models", reward.NORM_ITEM, "chat_template"]
  )
  assert items["models"]["reward"]["kind"] == "scalar"
  assert items[reward.NORM_ITEM] == {"gain": 1.0, "bias": 0.0}, "no norm_policy: identity"
  assert items["chat_template"] == chat.CHAT_TEMPLATE


def test_overlong_pairs_are_dropped_and_counted_or_truncated(tmp_path):
  """data.overflow: over-long pairs are dropped (the default) or truncated, and counted."""
  sum_pairs(tmp_path / "p.jsonl", [(a, b, 9) for a in range(5) for b in range(5) if a + b != 9])
  with open(tmp_path / "p.jsonl", "a") as f:
    for k in range(3):
      f.write(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3" * (20 + k)}) + "\n")
  config = rm_config(tmp_path / "p.jsonl")
  config.data.val_fraction = 0.0
  config.data.seq_len = 16  # a pair is 13 tokens; the three long ones 32 and more
  stage = build_stage(config, str(tmp_path / "drop"))
  assert stage.data_cfg.overflow == "drop"
  assert stage.train_stats == {"examples": 28, "kept": 25, "truncated": 0, "dropped": 3}
  assert len(stage.train_arrays["margin"]) == 25
  stage.close()
  config.data.overflow = "truncate"
  stage = build_stage(config, str(tmp_path / "truncate"))
  assert stage.train_stats == {"examples": 28, "kept": 28, "truncated": 3, "dropped": 0}
  assert (stage.train_arrays["rejected_segment_ids"][-3:] == 1).all(), "cut to fill the row"
  stage.close()


def test_normalized_and_fit_norm():
  scores = np.array([0.5, -1.0, 2.0, 4.0, 0.0])
  norm = reward.fit_norm(scores)
  out = reward.normalized(scores, norm["gain"], norm["bias"])
  np.testing.assert_allclose([out.mean(), out.std()], [0.0, 1.0], atol=1e-12)
  assert norm["samples"] == 5
  np.testing.assert_allclose(reward.normalized(np.array([1.0, 3.0]), 2.0, -1.0), [1.0, 5.0])


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
  """A tiny SFT policy on sums (a few steps: its samples vary), its workdir and prompts."""
  from configs.experiments import sft_tiny_test
  from train import loop

  root = tmp_path_factory.mktemp("policy")
  with open(root / "chats.jsonl", "w") as f:
    for a, b, _ in all_sum_pairs(seed=1)[:200]:
      f.write(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n")
  c = sft_tiny_test.get_config()
  c.data.path, c.data.eval_replies = str(root / "chats.jsonl"), 0
  c.train.steps, c.train.checkpoint_every = 4, 4
  loop.train(c, str(root / "sft"))
  prompts = [f"{a}+{b}=" for a, b, _ in all_sum_pairs(seed=2)[:16]]
  with open(root / "prompts.jsonl", "w") as f:
    f.write("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
  return str(root / "sft"), str(root / "prompts.jsonl"), prompts


def norm_config(policy_dir, prompts_path, pairs_path):
  c = rm_config(pairs_path, steps=6, checkpoint_every=3)
  c.model = ml_collections.ConfigDict({"dropout": 0.0})  # the SFT weights give the architecture
  c.train.init_from = policy_dir
  c.rlhf.norm_policy, c.rlhf.norm_prompts = policy_dir, prompts_path
  c.rlhf.norm_samples, c.rlhf.norm_tokens, c.rlhf.norm_seed = 16, 6, 3
  return c


def test_reward_norm_puts_the_policys_samples_at_mean_0_std_1(policy, tmp_path):
  """Each checkpoint's "reward_norm" is fitted to its own parameters: the policy's samples for
  the same prompts and seed, drawn and scored here independently (each sequence alone, no
  padding), normalise to mean 0 and std 1."""
  from train import loop

  policy_dir, prompts_path, prompts = policy
  sum_pairs(tmp_path / "pairs.jsonl", all_sum_pairs(seed=3)[:200])
  config = norm_config(policy_dir, prompts_path, tmp_path / "pairs.jsonl")
  loop.train(config, str(tmp_path / "rm"))

  stage = build_stage(config, str(tmp_path / "peek"))  # the run's mesh and tokenizer
  mesh, tok = stage.mesh, stage.tokenizer
  stage.close()
  policy_cfg, _, policy_params, _ = load_for_inference(policy_dir, mesh=mesh.mesh, rules=mesh.rules)
  sampler = Sampler(nnx.graphdef(nnx.eval_shape(lambda: _lm(policy_cfg))), mesh.mesh, mesh.rules)
  rendered = [chat.render_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
  tokens, mask = left_pad(rendered, tok.pad_id)
  sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_id=tok.end_id, pad_id=tok.pad_id)
  out = sampler(policy_params, tokens, mask, jax.random.PRNGKey(3), sampling)
  responses = [
    [int(t) for t in ids[live > 0]]
    for ids, live in zip(np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN))
  ]
  assert sum(tok.end_id in r for r in responses) >= 1, "some responses end at <|end|>"
  assert len({tuple(r) for r in responses}) > 4, "samples should vary"

  checkpoints = ckpt.Checkpointer(str(tmp_path / "rm" / "checkpoints"))
  norms = {}
  for step in (3, 6):
    norm = checkpoints.restore_items(step, [reward.NORM_ITEM])[reward.NORM_ITEM]
    assert norm["samples"] == 16
    cfg, _, params, _ = load_for_inference(str(tmp_path / "rm"), step)
    one = last_value_alone(nnx.merge(nnx.graphdef(ScalarModel(cfg, rngs=nnx.Rngs(0))), params))
    scores = np.array([one(p + r) for p, r in zip(rendered, responses)])
    normed = reward.normalized(scores, norm["gain"], norm["bias"])
    np.testing.assert_allclose(
      [normed.mean(), normed.std()], [0.0, 1.0], atol=2e-4, err_msg=f"{step}"
    )
    norms[step] = norm
  assert norms[3] != norms[6], "the parameters changed, so must the normalisation"


def _lm(cfg):
  from train.weights import make_model

  return make_model("lm", cfg, 0)


def test_reward_norm_is_refitted_only_when_the_parameters_change(policy, tmp_path):
  """checkpoint_items samples the policy once and scores again only after a step."""
  policy_dir, prompts_path, _ = policy
  sum_pairs(tmp_path / "pairs.jsonl", all_sum_pairs(seed=3)[:40])
  stage = build_stage(
    norm_config(policy_dir, prompts_path, tmp_path / "pairs.jsonl"), str(tmp_path)
  )
  calls = []
  scores = stage.scores
  stage.scores = lambda *a: calls.append(1) or scores(*a)
  first = stage.checkpoint_items()[reward.NORM_ITEM]
  assert stage.checkpoint_items()[reward.NORM_ITEM] == first and len(calls) == 1
  rows = stage._norm_rows
  state = stage.states["reward"]
  stage.states["reward"] = state.replace(step=state.step + 1)
  assert stage.checkpoint_items()[reward.NORM_ITEM] == first, "same parameters, same item"
  assert len(calls) == 2 and stage._norm_rows is rows, "scored again, not sampled again"
  stage.close()


def test_a_policy_with_another_tokenizer_is_refused(policy, tmp_path):
  """From scratch, the reward model's character tokenizer comes from its pairs: one with a
  letter the policy never saw cannot score the policy's samples."""
  policy_dir, prompts_path, _ = policy
  with open(tmp_path / "pairs.jsonl", "w") as f:
    for k in range(10):
      f.write(json.dumps({"prompt": f"{k}+1=", "chosen": str(k + 1), "rejected": "two"}) + "\n")
  config = norm_config(policy_dir, prompts_path, tmp_path / "pairs.jsonl")
  config.train.init_from = ""
  config.model = rm_config("unused").model
  with pytest.raises(ValueError, match=r"rlhf.norm_policy=.* another tokenizer"):
    build_stage(config, str(tmp_path))
