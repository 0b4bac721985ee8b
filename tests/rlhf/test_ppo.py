"""PPO: GAE, the losses, the KL controller and the score's placement against plain Python or
hand-computed values; the sampler and the trainer agree on logprobs; a first minibatch has
ratio 1 and KL 0; and on a one-step bandit PPO reaches the closed-form KL-regularised optimum."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from data.chat import render_prompt
from rlhf.gae import gae, whiten
from rlhf.kl import KLController, kl_estimate
from rlhf.objectives import clipped_policy_loss, clipped_value_loss
from rlhf.ppo import final_scores
from rlhf.score import advantages
from train.stage import build_stage

LETTERS = "abcdefgh"
BANDIT_REWARDS = {c: 0.25 * i for i, c in enumerate(LETTERS)}


def bandit_reward(records, completions):
  """A fixed reward per one-letter response (0 for anything else): a programmatic reward."""
  return [BANDIT_REWARDS.get(c, 0.0) for c in completions]


def letters_reward(records, completions):
  """1 per letter 'a' in the response: rewards longer responses of a's."""
  return [c.count("a") / 4.0 for c in completions]


def gae_loop(rewards, values, lengths, gamma, lam):
  """GAE by the book, one row at a time, V = 0 past the end."""
  adv = np.zeros_like(rewards)
  for b, n in enumerate(lengths):
    last = 0.0
    for t in reversed(range(n)):
      next_v = values[b, t + 1] if t + 1 < n else 0.0
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  returns = adv + np.where(
    np.arange(rewards.shape[1])[None] < np.asarray(lengths)[:, None], values, 0
  )
  return adv, returns


def test_gae_equals_a_plain_python_loop():
  rng = np.random.default_rng(0)
  lengths = [5, 2, 7, 1]
  rewards = rng.normal(size=(4, 7)).astype(np.float32)
  values = rng.normal(size=(4, 7)).astype(np.float32)
  mask = (np.arange(7)[None] < np.array(lengths)[:, None]).astype(np.float32)
  for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (0.99, 1.0)):
    want_adv, want_ret = gae_loop(rewards, values, lengths, gamma, lam)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv * mask, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, want_ret * mask, rtol=1e-5, atol=1e-6)


def test_whitening_reads_only_valid_tokens():
  x = np.array([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]], np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 0]], np.float32)
  valid = np.array([1.0, 2.0, 3.0, 4.0])
  want = (valid - valid.mean()) / valid.std()
  got = whiten(x, mask)
  np.testing.assert_allclose(np.asarray(got)[mask > 0], want, rtol=1e-5)
  assert (np.asarray(got)[mask == 0] == 0).all()
  kept = whiten(x, mask, shift_mean=False)
  np.testing.assert_allclose(np.asarray(kept)[mask > 0], want + valid.mean(), rtol=1e-5)


def test_policy_loss_equals_hand_computed_values():
  """Two tokens per row; ratios e^0.5 (clipped above for A > 0), e^-0.5 (clipped below for
  A < 0) and 1, against the formulas written out; dual clip caps a negative advantage."""
  logp = np.array([[0.5, -0.5, 0.0]], np.float32)
  old = np.zeros((1, 3), np.float32)
  adv = np.array([[2.0, -1.0, 3.0]], np.float32)
  mask = np.array([[1.0, 1.0, 0.0]], np.float32)
  loss, m = clipped_policy_loss(logp, old, adv, mask, 0.2, 0.2)
  r = math.exp(0.5)
  want0 = max(-2.0 * r, -2.0 * 1.2)  # = -2.4: the clipped term is the larger
  want1 = max(1.0 * math.exp(-0.5), 1.0 * 0.8)  # = 0.8: -A r = 0.607 < -A clip(r) = 0.8
  np.testing.assert_allclose(np.asarray(loss), [[want0, want1, 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(m["clip_fraction"]), [[1.0, 1.0, 0.0]])
  np.testing.assert_allclose(
    np.asarray(m["approx_kl"]), [[math.expm1(0.5) - 0.5, math.expm1(-0.5) + 0.5, 0.0]], rtol=1e-6
  )
  # Dual clip: A = -1 and a huge ratio, e^3: the loss is capped at -A * 3 = 3.
  loss, _ = clipped_policy_loss(
    np.array([[3.0]]), np.zeros((1, 1)), np.array([[-1.0]]), np.ones((1, 1)), 0.2, 0.2, 3.0
  )
  np.testing.assert_allclose(np.asarray(loss), [[3.0]], rtol=1e-6)
  # The log-ratio is clamped: a stale logprob cannot overflow exp.
  loss, m = clipped_policy_loss(
    np.array([[0.0]]), np.array([[-1000.0]]), np.array([[1.0]]), np.ones((1, 1)), logratio_clamp=20
  )
  assert np.isfinite(np.asarray(loss)).all() and float(m["ratio"][0, 0]) == pytest.approx(
    math.exp(20), rel=1e-5
  )


def test_value_loss_equals_hand_computed_values():
  values = np.array([[1.0, 0.0, 5.0]], np.float32)
  old = np.array([[0.5, 0.5, 0.0]], np.float32)
  returns = np.array([[2.0, -1.0, 9.0]], np.float32)
  mask = np.array([[1.0, 1.0, 0.0]], np.float32)
  loss, clipped = clipped_value_loss(values, old, returns, mask, clip=0.2)
  # Row 0: V 1.0 is clipped to 0.7: max((1-2)^2, (0.7-2)^2) = 1.69. Row 1: V 0 -> 0.3:
  # max((0+1)^2, (0.3+1)^2) = 1.69. Both halved.
  np.testing.assert_allclose(np.asarray(loss), [[0.845, 0.845, 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(clipped), [[1.0, 1.0, 0.0]])


def test_kl_estimators_match_their_formulas():
  logp = np.array([-1.0, -2.0, -0.1], np.float32)
  ref = np.array([-1.5, -1.0, -0.1], np.float32)
  d = logp - ref
  np.testing.assert_allclose(kl_estimate(logp, ref, "k1"), d, rtol=1e-6)
  np.testing.assert_allclose(kl_estimate(logp, ref, "k2"), d**2 / 2, rtol=1e-6)
  np.testing.assert_allclose(kl_estimate(logp, ref, "k3"), np.expm1(-d) + d, rtol=1e-5, atol=1e-7)


def test_adaptive_kl_follows_its_formula_over_several_steps():
  ctl = KLController(0.15, "adaptive", target=6.0, horizon=10000)
  beta = 0.15
  for kl, n in ((12.0, 64), (6.6, 64), (3.0, 128), (0.0, 64), (6.0, 32)):
    error = min(max(kl / 6.0 - 1.0, -0.2), 0.2)
    beta *= 1 + error * n / 10000
    assert ctl.update(kl, n) == pytest.approx(beta, rel=1e-12)
  fixed = KLController(0.15, "fixed")
  assert fixed.update(100.0, 64) == 0.15


def test_the_score_lands_on_the_last_response_token_and_missing_eos_is_penalised():
  """Rows of lengths 3, 1 and 4 (the last cut at the length limit, no EOS): the score is
  added at index 2, 0 and 3, every other token carries only -beta * KL; the penalty is
  subtracted from the row without EOS alone."""
  lengths = [3, 1, 4]
  mask = (np.arange(4)[None] < np.array(lengths)[:, None]).astype(np.float32)
  old = np.full((3, 4), -1.0, np.float32)
  ref = np.full((3, 4), -1.5, np.float32)
  scores = final_scores(
    np.array([1.0, 2.0, 3.0]), {"gain": 2.0, "bias": -1.0}, np.array([True, True, False]), 0.5
  )
  np.testing.assert_allclose(scores, [1.0, 3.0, 4.5])
  out = advantages(
    old,
    ref,
    np.zeros((3, 4), np.float32),
    jnp.asarray(scores),
    mask,
    jnp.float32(0.1),
    kl_estimator="k1",
    whiten_rewards=False,
    gamma=1.0,
    lam=1.0,
  )
  want = -0.1 * 0.5 * mask
  for b, n in enumerate(lengths):
    want[b, n - 1] += scores[b]
  np.testing.assert_allclose(np.asarray(out["rewards"]), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["kl_B"]), 0.5 * np.array(lengths), rtol=1e-6)


def write_prompts(path, prompts):
  with open(path, "w") as f:
    for p in prompts:
      f.write(json.dumps({"prompt": p}) + "\n")


def ppo_config(tmp_path, reward, prompts=None, **rlhf):
  from configs import base

  c = base.get_config()
  c.stage = "rlhf.ppo"
  c.model = base.model_config("tiny", vocab_size=0, max_seq_len=64, init_std=0.3)
  path = tmp_path / "prompts.jsonl"
  write_prompts(path, prompts or [LETTERS] * 64)
  c.rlhf = ml_collections.ConfigDict(
    dict(
      prompts=str(path), reward=reward, batch_size=64, response_len=1, beta=0.5, max_prompt_len=16
    )
  )
  c.rlhf.update(rlhf)
  c.train.update(eval_every=0, log_every=10, checkpoint_every=0, progress=False, tensorboard=False)
  c.opt.update(lr=1e-3, warmup_steps=10)
  return c


def run_iteration(stage):
  """One loop iteration by hand: each (state, batch) through that state's step; returns the
  first policy minibatch's metrics."""
  first = None
  for name, batch in stage.updates():
    stage.states[name], m = stage.steps[name](stage.states[name], batch)
    if name == "policy" and first is None:
      first = jax.device_get(m)
  return first


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_sampler_and_trainer_logprobs_agree_and_a_first_minibatch_has_ratio_1_and_kl_0(
  tmp_path, critic
):
  """At temperature 0.7 and 6-token responses, the sampler's logprob of every response token
  equals the trainer's teacher-forced recomputation (fp32, 1e-5). With policy = old =
  reference (the first minibatch of the first iteration), the ratio is exactly 1, nothing is
  clipped, and the KL is exactly 0."""
  c = ppo_config(
    tmp_path, "tests.rlhf.test_ppo:letters_reward", response_len=6, temperature=0.7, critic=critic
  )
  stage = build_stage(c, str(tmp_path / "run"))
  first = run_iteration(stage)
  out, full = stage.last
  mask = out.response_mask_BxN > 0
  old = np.asarray(jax.device_get(full["old_logprobs"]))
  # fp32: a logprob near 0 is a difference of logits of magnitude ~10, each rounded to 1e-6.
  np.testing.assert_allclose(out.sampler_logprobs_BxN[mask], old[mask], rtol=1e-5, atol=1e-5)
  gap = np.abs(out.sampler_logprobs_BxN - old)[mask].max()
  assert stage.iteration_metrics()["logprob_gap_max"] == pytest.approx(gap) and gap < 1e-4
  assert mask.sum(axis=1).min() < 6 or not out.eos_B.any(), "responses of several lengths"
  assert float(first["ratio"]) == 1.0
  assert float(first["clip_fraction"]) == 0.0 and float(first["approx_kl"]) == 0.0
  assert stage.iteration_metrics()["kl"] == 0.0


def bandit_distribution(stage, params):
  """pi(y | the bandit's prompt) over the whole vocabulary."""
  ids = render_prompt(stage.tokenizer, [{"role": "user", "content": LETTERS}])
  model = nnx.merge(stage.policy.graphdef, jax.device_get(params))
  return np.asarray(jax.nn.softmax(model(jnp.asarray([ids]))[0, -1]), np.float64)


@pytest.mark.parametrize("seed,critic", [(0, "separate"), (1, "shared")])
def test_ppo_reaches_the_kl_regularised_optimum_of_a_bandit(tmp_path, seed, critic):
  """One prompt, one-token responses, a fixed reward per token, fixed beta 0.5: the optimum of
  E[r] - beta KL(pi || ref) is pi*(y) ∝ ref(y) exp(r(y) / beta). After 200 iterations PPO is
  within total variation 0.05 of it, on two seeds: one with a separate critic, one with a
  critic sharing the policy's trunk."""
  c = ppo_config(tmp_path, "tests.rlhf.test_ppo:bandit_reward", seed=seed, critic=critic)
  c.train.seed, c.train.steps = seed, 200
  # Gentle steps: a policy that drops a token early never samples it again to recover it.
  c.opt.lr = 3e-4
  c.mesh.devices = 1  # 150 iterations of a tiny model: faster than split 8 ways on 2 cores
  stage = build_stage(c, str(tmp_path / "run"))
  ref = bandit_distribution(stage, stage.ref_params)
  r = np.array([BANDIT_REWARDS.get(stage.tokenizer.decode([i]), 0.0) for i in range(len(ref))])
  star = ref * np.exp(r / 0.5)
  star /= star.sum()
  assert 0.5 * np.abs(star - ref).sum() > 0.3, "the optimum should be far from the reference"
  for _ in range(c.train.steps):
    run_iteration(stage)
  got = bandit_distribution(stage, stage.states["policy"].params)
  tv = 0.5 * np.abs(got - star).sum()
  assert tv < 0.05, (
    f"total variation {tv:.3f} to pi*; pi {np.round(got, 3)}, pi* {np.round(star, 3)}"
  )


def test_reward_functions_that_misbehave_are_named(tmp_path):
  from rlhf import rewards

  records = [{"prompt": "ab", "answer": 3}]
  with pytest.raises(
    rewards.RewardError, match=r"reward function m:f raised ZeroDivisionError.*'answer': 3"
  ):
    rewards.call(lambda r, c: [1 / 0], "m:f", records, ["x"])
  with pytest.raises(rewards.RewardError, match=r"m:f returned 2 scores for 1 completions"):
    rewards.call(lambda r, c: [1.0, 2.0], "m:f", records, ["x"])
  with pytest.raises(rewards.RewardError, match=r"m:f returned nan for completion 0 'x'"):
    rewards.call(lambda r, c: [float("nan")], "m:f", records, ["x"])
  with pytest.raises(rewards.RewardError, match=r"m:f must return one float per completion"):
    rewards.call(lambda r, c: ["high"], "m:f", records, ["x"])
  with pytest.raises(rewards.RewardError, match=r"cannot import module 'no_such_module'"):
    rewards.load_function("no_such_module:f")
  with pytest.raises(rewards.RewardError, match=r"has no function 'nope'"):
    rewards.load_function("tests.rlhf.test_ppo:nope")


def ppo_iteration(root, layout_name, devices):
  """One PPO iteration under a layout: (rollout, scored batch, states), on the host."""
  (root / layout_name).mkdir()
  c = ppo_config(root / layout_name, "tests.rlhf.test_ppo:letters_reward", response_len=4)
  # kv heads, the MLP and the vocabulary (15 ids, padded to 16) split over tensor 2.
  c.model.n_kv_heads, c.model.d_ff, c.model.vocab_size = 2, 128, 16
  c.mesh.layout, c.mesh.devices = layout_name, devices
  # As in tests/train/test_layouts.py: Adam's eps 1e-3 keeps each update a smooth function of
  # its gradient, so a 1e-7-relative difference in reduction order stays that small.
  c.opt.eps = 1e-3
  stage = build_stage(c, str(root / layout_name / "run"))
  run_iteration(stage)
  out, full = stage.last
  return out, jax.device_get(full), jax.device_get(stage.states)


@pytest.fixture(scope="module")
def ppo_on_one_device(tmp_path_factory):
  return ppo_iteration(tmp_path_factory.mktemp("ppo_one_device"), "dp", 1)


@pytest.mark.parametrize("layout", ["fsdp", "dp_fsdp_tp"])
def test_a_ppo_iteration_on_a_layout_equals_one_device(tmp_path, layout, ppo_on_one_device):
  """One iteration (rollout at T = 1, scoring, 4 epochs x 4 minibatches of policy and critic
  updates) on 8 devices under `layout` against the same on one device: the rollout tokens, the
  old logprobs, the advantages and the updated parameters of both models (rtol 1e-5 of each
  tensor's scale)."""
  from tests.conftest import assert_trees_close

  out1, full1, states1 = ppo_on_one_device
  out8, full8, states8 = ppo_iteration(tmp_path, layout, 8)
  np.testing.assert_array_equal(out8.tokens_BxL, out1.tokens_BxL)
  np.testing.assert_array_equal(out8.response_mask_BxN, out1.response_mask_BxN)
  for key in ("old_logprobs", "advantages", "returns"):
    np.testing.assert_allclose(full8[key], full1[key], rtol=1e-5, atol=1e-5, err_msg=key)
  for name in ("policy", "critic"):
    assert_trees_close(states8[name].params, states1[name].params, rtol=1e-5)
