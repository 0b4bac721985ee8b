"""GRPO: group advantages, loss aggregation and the clipped loss with its KL term against NumPy,
loops and hand-computed values; the KL terms' gradients against closed forms; a first update
has ratio 1 and KL 0; and on the PPO bandit GRPO reaches the KL-regularised optimum."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf import rewards
from rlhf.grpo import GRPOConfig, aggregate, episode_batch, group_advantages, grpo_token_loss
from rlhf.kl import kl_estimate
from tests.rlhf.test_ppo import BANDIT_REWARDS, bandit_distribution, ppo_config, run_iteration
from train.stage import build_stage


def loo_advantages(rewards, g):
  """RLOO by its definition: each reward less the mean of its group's other rewards."""
  out = []
  for start in range(0, len(rewards), g):
    group = rewards[start : start + g]
    for r in group:
      out.append(r - (sum(group) - r) / (g - 1))
  return np.array(out)


def test_group_advantages_equal_numpy_and_a_loop():
  rng = np.random.default_rng(0)
  g = 4
  r = rng.normal(size=12).astype(np.float32)
  r[4:8] = 0.5  # one group with all-equal rewards: no signal
  groups = r.reshape(-1, g)
  mean = groups.mean(axis=1, keepdims=True)
  std = groups.std(axis=1, ddof=1, keepdims=True)
  want = {
    "group": ((groups - mean) / (std + 1e-4)).reshape(-1),
    "batch": ((groups - mean) / (r.std(ddof=1) + 1e-4)).reshape(-1),
    "none": (groups - mean).reshape(-1),
    "rloo": loo_advantages(r.tolist(), g),
  }
  for how, expect in want.items():
    adv, flat, mean_std = group_advantages(jnp.asarray(r), g, how, 1e-4)
    np.testing.assert_allclose(np.asarray(adv), expect, rtol=1e-5, atol=1e-6, err_msg=how)
    np.testing.assert_array_equal(np.asarray(flat), [0] * 4 + [1] * 4 + [0] * 4)
    np.testing.assert_allclose(float(mean_std), std.mean(), rtol=1e-6)
  # The flat group's advantages are exactly 0 under every normalisation.
  assert (np.asarray(group_advantages(jnp.asarray(r), g, "group")[0])[4:8] == 0).all()


def test_loss_aggregations_equal_hand_values():
  """Rows of 3 and 1 response tokens (of at most 4): token mean (1+2+3+10)/4, sequence mean
  ((1+2+3)/3 + 10/1)/2, fixed sum (1+2+3+10)/(2*4); masked-out tokens never count."""
  loss = np.array([[1.0, 2.0, 3.0, 99.0], [10.0, 99.0, 99.0, 99.0]], np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
  for how, want in (("token_mean", 16 / 4), ("seq_mean", (2 + 10) / 2), ("fixed_sum", 16 / 8)):
    total, count = aggregate(jnp.asarray(loss), jnp.asarray(mask), how)
    assert float(total) / float(count) == pytest.approx(want, rel=1e-6), how
  # A sequence masked out entirely (truncated) leaves the sequence mean's count.
  total, count = aggregate(jnp.asarray(loss), jnp.asarray(mask * [[1], [0]]), "seq_mean")
  assert (float(total), float(count)) == (2.0, 1.0)


def test_grpo_token_loss_equals_hand_values():
  """Asymmetric clip (low 0.1, high 0.3) and a k3 KL term with beta 0.5: ratio e^0.4 with
  A = 1 is clipped at 1.3; ratio e^-0.2 with A = -2 at 0.9; ratio 1 with A = 0.5 is not;
  each plus 0.5 (e^(ref - logp) - (ref - logp) - 1)."""
  cfg = GRPOConfig(prompts="p", reward="m:f", clip_low=0.1, clip_high=0.3, beta=0.5)
  logp = np.array([[0.4, -0.2, 0.0]], np.float32)
  old = np.zeros((1, 3), np.float32)
  ref = np.array([[0.1, 0.3, -0.5]], np.float32)
  adv = np.array([[1.0, -2.0, 0.5]], np.float32)
  mask = np.ones((1, 3), np.float32)
  loss, m = grpo_token_loss(logp, old, ref, adv, mask, cfg)
  pg = [
    max(-1.0 * math.exp(0.4), -1.0 * 1.3),
    max(2.0 * math.exp(-0.2), 2.0 * 0.9),
    -0.5,
  ]
  k3 = [math.exp(r - lp) - (r - lp) - 1 for r, lp in zip(ref[0], logp[0])]
  np.testing.assert_allclose(
    np.asarray(loss)[0], [p + 0.5 * k for p, k in zip(pg, k3)], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_array_equal(np.asarray(m["clip_high_fraction"]), [[1, 0, 0]])
  np.testing.assert_array_equal(np.asarray(m["clip_low_fraction"]), [[0, 1, 0]])
  np.testing.assert_allclose(np.asarray(m["kl"])[0], k3, rtol=1e-5, atol=1e-7)
  # beta 0: the clipped ratio loss alone, and no reference is read.
  cfg0 = GRPOConfig(prompts="p", reward="m:f", clip_low=0.1, clip_high=0.3, beta=0.0)
  loss0, m0 = grpo_token_loss(logp, old, None, adv, mask, cfg0)
  np.testing.assert_allclose(np.asarray(loss0)[0], pg, rtol=1e-6)
  assert "kl" not in m0


def test_episode_batch_masks_truncated_and_flat_groups():
  adv = jnp.array([1.0, -1.0, 0.0, 0.0])
  flat = jnp.array([False, False, True, True])
  eos = jnp.array([1.0, 0.0, 1.0, 1.0])
  rmask = jnp.ones((4, 2), jnp.int32)
  out = episode_batch(adv, flat, eos, rmask, mask_truncated=True, mask_flat_groups=True)
  np.testing.assert_array_equal(np.asarray(out["response_mask"]), [[1, 1], [0, 0], [0, 0], [0, 0]])
  np.testing.assert_array_equal(np.asarray(out["advantages"]), [[1, 1], [-1, -1], [0, 0], [0, 0]])
  out = episode_batch(adv, flat, eos, rmask, mask_truncated=False, mask_flat_groups=False)
  assert (np.asarray(out["response_mask"]) == 1).all()


def expected_grad(logits, ref_logp, estimator):
  """The exact expectation over y ~ pi of the gradient of the per-token KL loss term at y
  (what the sampled loss estimates, on-policy), with respect to the logits."""

  def term(z, y):
    logp = jax.nn.log_softmax(z)[y]
    return kl_estimate(logp, ref_logp[y], estimator)

  pi = jax.nn.softmax(logits)
  grads = jnp.stack([jax.grad(term)(logits, y) for y in range(logits.shape[0])])
  return jnp.sum(pi[:, None] * grads, axis=0)


def test_kl_loss_terms_differentiate_the_kl_their_docs_name():
  """On-policy, k2 in the loss has the gradient of KL(pi || ref), the KL of the closed-form
  optimum pi* ∝ ref exp(r / beta); k3 (DeepSeekMath's) has the gradient of KL(ref || pi)
  instead, whose optimum is another policy. Exact expectations over a 5-token vocabulary."""
  logits = jnp.array([0.3, -1.0, 2.0, 0.0, 0.7])
  ref_logp = jax.nn.log_softmax(jnp.array([1.0, 0.0, -0.5, 0.2, 0.4]))

  def kl_pi_ref(z):
    logp = jax.nn.log_softmax(z)
    return jnp.sum(jnp.exp(logp) * (logp - ref_logp))

  def kl_ref_pi(z):
    logp = jax.nn.log_softmax(z)
    return jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp))

  np.testing.assert_allclose(
    expected_grad(logits, ref_logp, "k2"), jax.grad(kl_pi_ref)(logits), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    expected_grad(logits, ref_logp, "k3"), jax.grad(kl_ref_pi)(logits), rtol=1e-5, atol=1e-6
  )
  assert not np.allclose(jax.grad(kl_pi_ref)(logits), jax.grad(kl_ref_pi)(logits), atol=1e-2)


def grpo_config(tmp_path, reward, **rlhf):
  """The PPO tests' setting (one prompt of 8 letters, a tiny model), as a GRPO run."""
  c = ppo_config(tmp_path, reward)
  c.stage = "rlhf.grpo"
  c.rlhf.update({"batch_size": 8, "group_size": 8, **rlhf})
  return c


@pytest.mark.parametrize("on_policy", [True, False], ids=["on_policy", "two_iterations"])
def test_a_first_update_has_ratio_1_kl_0_and_the_scored_advantages(tmp_path, on_policy):
  """Policy = old = reference at the first update: the ratio is exactly 1, nothing clips and
  the KL is exactly 0. The advantages the update reads are the group advantages of the
  function's rewards on the decoded completions (NumPy), each group one prompt's 8 samples.
  On policy, truncated responses are masked out of the loss (mask_truncated); with two
  iterations of two minibatches, every response token stays in."""
  extra = {"mask_truncated": True} if on_policy else {"iterations": 2, "minibatches": 2}
  c = grpo_config(
    tmp_path, "tests.rlhf.test_ppo:letters_reward", response_len=6, temperature=0.7, **extra
  )
  c.mesh.devices = 8 if on_policy else 4  # minibatches of 4 prompts (whole groups)
  stage = build_stage(c, str(tmp_path / "run"))
  assert stage.rl.on_policy == on_policy
  first = run_iteration(stage)
  out, full = stage.last
  assert float(first["ratio"]) == 1.0 and float(first["kl"]) == 0.0
  assert float(first["clip_fraction"]) == 0.0
  texts = stage.completions(out)
  r = np.array([t.count("a") / 4.0 for t in texts], np.float32).reshape(-1, 8)
  want = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
  n = out.response_mask_BxN.shape[1]
  got = np.asarray(jax.device_get(full["advantages"])).reshape(-1, n)
  np.testing.assert_allclose(got[:, 0], want.reshape(-1), rtol=1e-5, atol=1e-5)
  loss_mask = np.asarray(jax.device_get(full["response_mask"])).reshape(-1, n)
  keep = out.eos_B[:, None] if on_policy else 1
  np.testing.assert_array_equal(loss_mask, out.response_mask_BxN * keep)
  assert (~out.eos_B).any() and out.eos_B.any(), "both truncated and finished responses"
  figures = stage.iteration_metrics()
  assert figures["truncated_fraction"] == pytest.approx(1 - out.eos_B.mean())
  gap = first["logprob_gap"] if on_policy else figures["logprob_gap_max"]
  assert float(gap) < 1e-4


def test_beta_0_loads_no_reference(tmp_path):
  c = grpo_config(tmp_path, "tests.rlhf.test_ppo:letters_reward", beta=0.0)
  stage = build_stage(c, str(tmp_path / "run"))
  assert stage.ref_params is None and "ref" not in stage.graphdefs
  assert "ref_logprobs" not in stage.keys
  run_iteration(stage)


def nan_reward(records, completions):
  return [float("nan")] * len(completions)


def test_a_reward_function_returning_nan_is_named_by_the_stage(tmp_path):
  c = grpo_config(tmp_path, "tests.rlhf.test_grpo:nan_reward")
  stage = build_stage(c, str(tmp_path / "run"))
  with pytest.raises(rewards.RewardError, match=r"tests.rlhf.test_grpo:nan_reward returned nan"):
    run_iteration(stage)


@pytest.mark.parametrize(
  "seed,kl", [(0, "reward"), (1, "reward"), (0, "k2_loss")], ids=["reward0", "reward1", "k2_loss0"]
)
def test_grpo_reaches_the_kl_regularised_optimum_of_a_bandit(tmp_path, seed, kl):
  """The PPO bandit (one prompt, one-token responses, a fixed reward per token), beta 0.5,
  the RLOO baseline. With the KL as a reward term (summed k1), GRPO's gradient is the unbiased
  gradient of E[r] - beta KL(pi || ref), whose optimum is pi* ∝ ref exp(r / beta); with k2 as
  a loss term it is too, on policy. Within total variation 0.05 of pi* after 150 iterations
  of 64 episodes. (k3 in the loss differentiates KL(ref || pi) instead and ends 0.4 to 0.6
  away: test_kl_loss_terms_differentiate_the_kl_their_docs_name.)"""
  mode = (
    {"kl_penalty": "reward"} if kl == "reward" else {"kl_penalty": "loss", "kl_estimator": "k2"}
  )
  c = grpo_config(
    tmp_path, "tests.rlhf.test_ppo:bandit_reward", beta=0.5, advantage="rloo", seed=seed, **mode
  )
  c.train.seed, c.train.steps = seed, 150
  c.opt.lr = 3e-3
  c.mesh.devices = 1
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
  assert tv < 0.05, f"total variation {tv:.3f}; pi {np.round(got, 3)}, pi* {np.round(star, 3)}"


def test_grouped_logits_equal_the_flat_forward_and_so_do_their_gradients():
  """Three left-padded prompts of different lengths, four responses each of different lengths
  (padding after the end): the grouped forward (each prompt run once, its KV cache shared by
  its group) gives the flat forward's logprob of every response token, and the gradient of
  their sum with respect to every parameter, to float32 rounding."""
  from flax import nnx

  from model.config import ModelConfig
  from model.transformer import Transformer
  from rlhf.objectives import response_logprobs
  from rlhf.rollout import sequences
  from tests.conftest import assert_trees_close

  cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  p, g, s, n = 3, 4, 6, 5
  prompt = rng.integers(1, 16, (p, s)).astype(np.int32)
  pmask = (np.arange(s)[None] >= np.array([[0], [2], [4]])).astype(np.int32)  # left padding
  prompt *= pmask
  lengths = rng.integers(1, n + 1, (p, g))
  rmask = (np.arange(n)[None, None] < lengths[..., None]).astype(np.int32)
  resp = rng.integers(1, 16, (p, g, n)).astype(np.int32) * rmask
  tokens, mask, positions = sequences(
    np.repeat(prompt, g, 0), np.repeat(pmask, g, 0), resp.reshape(p * g, n), rmask.reshape(-1, n)
  )
  flat = {
    "tokens": tokens,
    "mask": mask,
    "positions": positions,
    "response_mask": rmask.reshape(-1, n),
  }
  grouped = {
    "prompt_tokens": prompt,
    "prompt_mask": pmask,
    "response_tokens": resp,
    "response_mask": rmask,
  }

  def total(params, batch):
    logp, _ = response_logprobs(nnx.merge(graphdef, params), batch, 0.7)
    return jnp.sum(logp.reshape(p * g, n) * rmask.reshape(-1, n)), logp.reshape(p * g, n)

  grad = jax.jit(jax.value_and_grad(total, has_aux=True))
  (_, lp_flat), g_flat = grad(params, flat)
  (_, lp_grouped), g_grouped = grad(params, grouped)
  m = rmask.reshape(-1, n) > 0
  np.testing.assert_allclose(
    np.asarray(lp_grouped)[m], np.asarray(lp_flat)[m], rtol=1e-5, atol=1e-5
  )
  assert_trees_close(g_grouped, g_flat, rtol=1e-5)


def test_a_grpo_iteration_on_a_sharded_layout_equals_one_device(tmp_path):
  """One iteration (the grouped rollout at T = 1, the reference's scoring pass, two iterations
  of two minibatches of whole groups) on 8 devices under dp_fsdp_tp against the same on one
  device: the sampled tokens, the advantages, the reference logprobs and the updated
  parameters (rtol 1e-5 of each tensor's scale)."""
  from tests.conftest import assert_trees_close

  def one(layout, devices):
    c = grpo_config(
      tmp_path / layout,
      "tests.rlhf.test_ppo:letters_reward",
      response_len=4,
      batch_size=16,
      group_size=4,
      iterations=2,
      minibatches=2,
    )
    # kv heads, the MLP and the vocabulary (15 ids, padded to 16) split over tensor 2.
    c.model.n_kv_heads, c.model.d_ff, c.model.vocab_size = 2, 128, 16
    c.mesh.layout, c.mesh.devices = layout, devices
    c.opt.eps = 1e-3  # as tests/train/test_layouts.py: updates smooth in their gradients
    stage = build_stage(c, str(tmp_path / layout / "run"))
    run_iteration(stage)
    out, full = stage.last
    return out, jax.device_get(full), jax.device_get(stage.states["policy"].params)

  (tmp_path / "dp").mkdir()
  (tmp_path / "dp_fsdp_tp").mkdir()
  out1, full1, params1 = one("dp", 1)
  out8, full8, params8 = one("dp_fsdp_tp", 8)
  np.testing.assert_array_equal(out8.tokens_BxL, out1.tokens_BxL)
  for key in ("advantages", "old_logprobs", "ref_logprobs"):
    np.testing.assert_allclose(full8[key], full1[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert_trees_close(params8, params1, rtol=1e-5)
