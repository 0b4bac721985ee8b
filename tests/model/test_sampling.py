"""The KV-cache sampler against slow full-forward references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.sampling import Sampler, SamplingConfig, filter_logits, left_pad
from tests.model.conftest import build

PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12], [99]]


def slow_greedy(model, prompt, n, eos=None):
  """Recomputes the whole prefix for every new token, with no cache. The buffer is right-padded
  to a fixed length (one compile); causality makes the padding invisible."""
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
  seq = list(prompt)
  for _ in range(n):
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, : len(seq)] = seq
    nxt = int(jnp.argmax(forward(params, buf)[0, len(seq) - 1]))
    seq.append(nxt)
    if nxt == eos:
      break
  return seq[len(prompt) :]


@pytest.mark.parametrize("name,scan", [("tiny", False), ("tiny_gpt2", True)])
def test_greedy_matches_slow_loop_and_stops_at_eos(name, scan):
  model = build(name, scan_layers=scan)
  graphdef, params = nnx.split(model)
  n = 8
  refs = [slow_greedy(model, p, n) for p in PROMPTS]
  eos = refs[0][2]  # row 0 (and any row that makes this token) stops there
  toks, mask = left_pad(PROMPTS, pad_id=0)
  out = Sampler(graphdef)(
    params,
    toks,
    mask,
    jax.random.key(0),
    SamplingConfig(max_new_tokens=n, temperature=0.0, eos_id=eos),
  )
  for row, prompt in enumerate(PROMPTS):
    want = slow_greedy(model, prompt, n, eos=eos)
    got = np.asarray(out.tokens_BxN[row])
    np.testing.assert_array_equal(got[: len(want)], want, err_msg=f"row {row}")
    assert np.all(got[len(want) :] == 0), "pad after EOS"
    np.testing.assert_array_equal(
      np.asarray(out.mask_BxN[row]), [1] * len(want) + [0] * (n - len(want))
    )
  assert int(out.mask_BxN[0].sum()) == refs[0].index(eos) + 1


def test_logprobs_equal_teacher_forced_recomputation():
  model = build("tiny")
  graphdef, params = nnx.split(model)
  cfg = SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=50, top_p=0.9)
  toks, mask = left_pad(PROMPTS, pad_id=0)
  out = Sampler(graphdef)(params, toks, mask, jax.random.key(3), cfg)
  full = jnp.concatenate([toks, out.tokens_BxN], axis=1)
  full_mask = jnp.concatenate([mask, out.mask_BxN], axis=1)
  pos = jnp.maximum(jnp.cumsum(full_mask, axis=1) - 1, 0)
  logits = model(full, pos, full_mask)
  p = toks.shape[1]
  logp = jax.nn.log_softmax(logits[:, p - 1 : -1] / cfg.temperature, axis=-1)
  want = jnp.take_along_axis(logp, out.tokens_BxN[..., None], axis=-1)[..., 0]
  m = np.asarray(out.mask_BxN, bool)
  np.testing.assert_allclose(np.asarray(out.logprobs_BxN)[m], np.asarray(want)[m], atol=1e-4)


def test_samples_per_prompt_prefill_once_and_equal_repeated_prompts():
  """samples=4: each prompt's prefill runs once and its cache serves 4 rows. The tokens and
  logprobs are those of sampling the prompts repeated 4 times (same key, same rows), and the
  rows of a group differ from each other."""
  model = build("tiny")
  graphdef, params = nnx.split(model)
  sampler = Sampler(graphdef)
  cfg = SamplingConfig(max_new_tokens=8, temperature=0.8)
  toks, mask = left_pad(PROMPTS, pad_id=0)
  grouped = sampler(params, toks, mask, jax.random.key(5), cfg, samples=4)
  rep = lambda x: np.repeat(x, 4, axis=0)
  repeated = sampler(params, rep(toks), rep(mask), jax.random.key(5), cfg)
  np.testing.assert_array_equal(grouped.tokens_BxN, repeated.tokens_BxN)
  np.testing.assert_array_equal(grouped.mask_BxN, repeated.mask_BxN)
  np.testing.assert_allclose(grouped.logprobs_BxN, repeated.logprobs_BxN, rtol=1e-5, atol=1e-6)
  assert grouped.tokens_BxN.shape == (12, 8)
  assert len({tuple(r) for r in np.asarray(grouped.tokens_BxN[:4])}) > 1


def test_seeded_reproducible_and_no_retrace_for_new_weights():
  model = build("tiny")
  graphdef, params = nnx.split(model)
  sampler = Sampler(graphdef)
  cfg = SamplingConfig(max_new_tokens=6, temperature=1.0)
  toks, mask = left_pad(PROMPTS, pad_id=0)
  a = sampler(params, toks, mask, jax.random.key(1), cfg)
  b = sampler(params, toks, mask, jax.random.key(1), cfg)
  c = sampler(params, toks, mask, jax.random.key(2), cfg)
  np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
  assert not np.array_equal(a.tokens_BxN, c.tokens_BxN)
  other = jax.tree.map(lambda x: x * 1.5, params)
  sampler(other, toks, mask, jax.random.key(1), cfg)
  assert sampler._generate._cache_size() == 1, "new weights must not retrace"


def test_top_k_one_is_greedy():
  model = build("tiny")
  graphdef, params = nnx.split(model)
  toks, mask = left_pad(PROMPTS, pad_id=0)
  s = Sampler(graphdef)
  greedy = s(params, toks, mask, jax.random.key(0), SamplingConfig(8, temperature=0.0))
  top1 = s(params, toks, mask, jax.random.key(5), SamplingConfig(8, temperature=1.3, top_k=1))
  np.testing.assert_array_equal(greedy.tokens_BxN, top1.tokens_BxN)


def numpy_filter(logits, k, p):
  out = logits.astype(np.float64).copy()
  for row in out:
    order = np.argsort(-row, kind="stable")
    keep = np.zeros(len(row), bool)
    if k > 0:
      keep[order[:k]] = True
    else:
      keep[:] = True
    probs = np.exp(row - row.max()) * keep
    probs /= probs.sum()
    mass = 0.0
    nucleus = np.zeros(len(row), bool)
    for idx in order:
      if not keep[idx]:
        continue
      if mass < p or not nucleus.any():
        nucleus[idx] = True
      mass += probs[idx]
    row[~nucleus] = -np.inf
  return out


@pytest.mark.parametrize("k,p", [(0, 0.5), (5, 1.0), (8, 0.7), (0, 0.999)])
def test_filter_logits_matches_numpy(k, p):
  logits = np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32) * 3
  got = np.asarray(filter_logits(jnp.asarray(logits), k, p))
  want = numpy_filter(logits, k, p)
  np.testing.assert_array_equal(got > -1e30, np.isfinite(want))


def test_sampling_frequencies_follow_the_filtered_distribution():
  """Many draws: empirical frequencies match softmax(filtered logits / T)."""
  logits = jnp.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
  cfg = SamplingConfig(max_new_tokens=1, temperature=0.8, top_k=4)
  from model.sampling import _pick

  keys = jax.random.split(jax.random.key(0), 20000)
  draws = jax.vmap(lambda k: _pick(k, logits, cfg)[0][0])(keys)
  freq = np.bincount(np.asarray(draws), minlength=6) / 20000
  scaled = np.array([2.0, 1.0, 0.5, 0.0]) / 0.8
  want = np.exp(scaled) / np.exp(scaled).sum()
  np.testing.assert_allclose(freq[:4], want, atol=0.015)
  assert freq[4:].sum() == 0


def test_bad_prompts_and_configs():
  with pytest.raises(ValueError, match="at least one token"):
    left_pad([[1], []], 0)
  for field, value in (
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("temperature", -0.1),
    ("top_k", -1),
    ("max_new_tokens", 0),
  ):
    with pytest.raises(ValueError, match=rf"SamplingConfig\.{field} must be .*got {value}"):
      SamplingConfig(**{field: value})
  model = build("tiny_gpt2")
  graphdef, params = nnx.split(model)
  toks, mask = left_pad(PROMPTS, 0)
  with pytest.raises(ValueError, match="left-padded"):
    Sampler(graphdef)(params, toks[:, ::-1], mask[:, ::-1], jax.random.key(0), SamplingConfig())
  with pytest.raises(ValueError, match="max_seq_len"):
    Sampler(graphdef)(params, toks, mask, jax.random.key(0), SamplingConfig(max_new_tokens=64))


@pytest.mark.parametrize("name,scan", [("tiny", False), ("tiny_gpt2", True)])
def test_stream_yields_the_tokens_of_call(name, scan):
  """Prefill plus one jitted pick-and-decode per token, on a prompt padded to its bucket, gives
  the tokens `__call__` gives for the same rng, and stops after yielding eos."""
  model = build(name, scan_layers=scan)
  graphdef, params = nnx.split(model)
  sampler = Sampler(graphdef, bucket=8)
  for cfg in (
    SamplingConfig(max_new_tokens=10, temperature=0.0),
    SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=50, top_p=0.9),
  ):
    for prompt in PROMPTS:
      toks, mask = left_pad([prompt], pad_id=0)
      want = np.asarray(sampler(params, toks, mask, jax.random.key(4), cfg).tokens_BxN[0])
      got = list(sampler.stream(params, toks, mask, jax.random.key(4), cfg))
      np.testing.assert_array_equal(got, want, err_msg=f"{cfg} {prompt}")
      eos = int(want[3])
      stop = dataclasses.replace(cfg, eos_id=eos)
      got = list(sampler.stream(params, toks, mask, jax.random.key(4), stop))
      assert got == want[: list(want).index(eos) + 1].tolist(), "up to and including eos"
  # Prompts of 1 to 6 tokens share one bucket (8 slots) and one cache (24 slots): one prefill,
  # and one step per picking rule. A budget of 9 still fits 24 slots: nothing recompiles.
  assert sampler._prefill._cache_size() == 1
  assert sampler._step._cache_size() == 2
  short = dataclasses.replace(cfg, max_new_tokens=9)
  assert len(list(sampler.stream(params, toks, mask, jax.random.key(4), short))) == 9
  assert (sampler._prefill._cache_size(), sampler._step._cache_size()) == (1, 2)


def test_stream_checks_its_prompt_before_running():
  graphdef, params = nnx.split(build("tiny_gpt2"))
  toks, mask = left_pad(PROMPTS, 0)
  sampler = Sampler(graphdef)
  with pytest.raises(ValueError, match="one prompt"):
    sampler.stream(params, toks, mask, jax.random.key(0), SamplingConfig())
  with pytest.raises(ValueError, match="max_seq_len"):
    sampler.stream(params, toks[:1], mask[:1], jax.random.key(0), SamplingConfig(62))
  with pytest.raises(ValueError, match="left-padded"):
    sampler.stream(params, toks[:1, ::-1], mask[:1, ::-1], jax.random.key(0), SamplingConfig(8))
