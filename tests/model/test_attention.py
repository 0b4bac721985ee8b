"""Attention against a plain NumPy reference, with GQA, padding and packed segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import attend, make_mask
from model.config import ModelConfig
from model.rope import frequencies, rope


def numpy_attention(q, k, v, q_seg, kv_seg):
  """Loop-free but independent: repeats kv heads, masks with -inf, softmax in float64."""
  b, l, h, d = q.shape
  g = k.shape[2]
  k = np.repeat(k, h // g, axis=2)
  v = np.repeat(v, h // g, axis=2)
  logits = np.einsum("blhd,bthd->bhlt", q.astype(np.float64), k) / np.sqrt(d)
  t = k.shape[1]
  allowed = np.zeros((b, l, t), bool)
  for bi in range(b):
    for i in range(l):
      for j in range(t):
        allowed[bi, i, j] = j <= i and kv_seg[bi, j] != 0 and q_seg[bi, i] == kv_seg[bi, j]
  logits = np.where(allowed[:, None], logits, -np.inf)
  out = np.zeros((b, l, h, d))
  for bi in range(b):
    for i in range(l):
      if not allowed[bi, i].any():
        continue  # a padding query: nothing to attend to; its output is never used
      for hi in range(h):
        w = np.exp(logits[bi, hi, i] - logits[bi, hi, i].max())
        out[bi, i, hi] = (w / w.sum()) @ v[bi, :, hi]
  return out, allowed.any(-1)


@pytest.mark.parametrize("impl,query_blocks", [("xla", 1), ("xla", 3), ("jax", 1)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_numpy(impl, query_blocks, heads, kv_heads):
  rng = np.random.default_rng(0)
  b, l, d = 2, 9, 8
  q = rng.normal(size=(b, l, heads, d)).astype(np.float32)
  k = rng.normal(size=(b, l, kv_heads, d)).astype(np.float32)
  v = rng.normal(size=(b, l, kv_heads, d)).astype(np.float32)
  # Row 0: left padding (segment 0) then one document; row 1: three packed documents.
  seg = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 2, 3, 3, 3, 3]], np.int32)
  mask = make_mask(jnp.asarray(seg), jnp.asarray(seg), jnp.arange(l), jnp.arange(l))
  got = np.asarray(
    attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, impl, query_blocks=query_blocks)
  )
  want, real = numpy_attention(q, k, v, seg, seg)
  assert np.isfinite(got).all(), "padding rows must stay finite"
  np.testing.assert_allclose(got[real], want[real], atol=1e-5)


# 'jax' with dropout takes the einsum path too: attend keeps that promise for every impl.
@pytest.mark.parametrize("impl,query_blocks", [("xla", 1), ("xla", 7), ("jax", 1)])
def test_attention_dropout_drops_probabilities(impl, query_blocks):
  """Probabilities dropped after the softmax with inverted scaling, against NumPy given the
  keep mask; without an rng (evaluation) dropout is off."""
  rng = np.random.default_rng(3)
  b, l, heads, kv_heads, d, rate = 2, 7, 4, 2, 8, 0.3
  q = rng.normal(size=(b, l, heads, d)).astype(np.float32)
  k = rng.normal(size=(b, l, kv_heads, d)).astype(np.float32)
  v = rng.normal(size=(b, l, kv_heads, d)).astype(np.float32)
  seg = np.ones((b, l), np.int32)
  mask = make_mask(jnp.asarray(seg), jnp.asarray(seg), jnp.arange(l), jnp.arange(l))
  key = jax.random.key(5)
  got = np.asarray(
    attend(
      jnp.asarray(q),
      jnp.asarray(k),
      jnp.asarray(v),
      mask,
      impl,
      rate,
      key,
      query_blocks=query_blocks,
    )
  )
  # The keep mask over (batch, kv head, query head in group, query, key) = heads h = g * R + r.
  keep = np.asarray(jax.random.bernoulli(key, 1.0 - rate, (b, kv_heads, heads // kv_heads, l, l)))
  keep = keep.reshape(b, heads, l, l)
  kr, vr = np.repeat(k, heads // kv_heads, 2), np.repeat(v, heads // kv_heads, 2)
  logits = np.einsum("blhd,bthd->bhlt", q.astype(np.float64), kr) / np.sqrt(d)
  logits = np.where(np.tril(np.ones((l, l), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum("bhlt,bthd->blhd", probs * keep / (1.0 - rate), vr)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert 0.5 < keep.mean() < 0.9  # about 1 - rate of 392 draws
  plain = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, impl)
  np.testing.assert_array_equal(
    np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, impl, rate, None)),
    np.asarray(plain),
  )


def test_rope_matches_rotation_of_pairs():
  """RoPE rotates the pair (x[i], x[i + K/2]) by position * theta^(-2i/K)."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
  pos = np.array([[0, 3, 7, 11, 100]], np.int32)
  freqs, factor = frequencies(ModelConfig(d_model=16, n_heads=2, n_kv_heads=2, rope_theta=1e4))
  assert factor == 1.0
  got = np.asarray(rope(jnp.asarray(x), jnp.asarray(pos), freqs))
  want = np.zeros_like(x, dtype=np.float64)
  for t in range(5):
    for hd in range(2):
      for i in range(4):
        angle = pos[0, t] * 10000.0 ** (-2 * i / 8)
        a, c = x[0, t, hd, i], x[0, t, hd, i + 4]
        want[0, t, hd, i] = a * np.cos(angle) - c * np.sin(angle)
        want[0, t, hd, i + 4] = c * np.cos(angle) + a * np.sin(angle)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Relative property: q.k after RoPE depends only on the position difference.
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)).astype(np.float32))
  dot = lambda pq, pk: float(
    jnp.sum(rope(q, jnp.array([[pq]]), freqs) * rope(k, jnp.array([[pk]]), freqs))
  )
  assert abs(dot(5, 2) - dot(13, 10)) < 1e-4
