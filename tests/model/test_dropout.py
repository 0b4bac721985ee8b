"""Dropout masks from the keyed index hash: an independent NumPy reimplementation, and the
statistics of independent Bernoulli draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.layers import dropout, hash_bits

M32 = 0xFFFFFFFF


def mix32(x):
  """lowbias32, element by element in Python integers."""
  x ^= x >> 16
  x = (x * 0x21F0AAAD) & M32
  x ^= x >> 15
  x = (x * 0x735A2D97) & M32
  return x ^ (x >> 15)


def numpy_hash_bits(key, shape):
  """The documented construction, one element at a time: the last two dims' flat index and the
  leading dims' flat index, each offset by its key word times its size, hashed and mixed."""
  k0, k1, k2 = (int(w) for w in np.asarray(jax.random.bits(key, (3,), jnp.uint32)))
  n_outer = max(len(shape) - 2, 0)
  outer_shape, inner_shape = shape[:n_outer], shape[n_outer:]
  n_in, n_out = int(np.prod(inner_shape)), int(np.prod(outer_shape))
  out = np.zeros(shape, np.uint32)
  for idx in np.ndindex(*shape):
    inner = int(np.ravel_multi_index(idx[n_outer:], inner_shape)) if inner_shape else 0
    outer = int(np.ravel_multi_index(idx[:n_outer], outer_shape)) if outer_shape else 0
    a = mix32((k0 * n_in + inner) & M32)
    b = mix32(((k1 * n_out + outer) & M32) * 0x9E3779B9 & M32)
    out[idx] = mix32(((a + b) & M32) ^ k2)
  return out


@pytest.mark.parametrize("shape", [(37,), (5, 7), (2, 3, 4, 5), (2, 1, 3, 6, 6)])
def test_hash_bits_match_numpy(shape):
  key = jax.random.key(11)
  np.testing.assert_array_equal(np.asarray(hash_bits(key, shape)), numpy_hash_bits(key, shape))


def test_hash_dropout_applies_the_threshold_and_scales():
  key, rate = jax.random.key(3), 0.3
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 9)).astype(np.float32))
  keep = numpy_hash_bits(key, x.shape) < round(0.7 * 2**32)
  want = np.where(keep, np.asarray(x) / 0.7, 0.0)
  np.testing.assert_allclose(np.asarray(dropout(x, rate, key, "hash")), want, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(dropout(x, rate, None, "hash")), np.asarray(x))


def test_hash_masks_look_like_independent_draws():
  """Keep rate, neighbours along every axis, and two keys, each against a Bernoulli(0.8) draw:
  deviations over 6 standard errors would not happen by chance."""
  p, shape = 0.8, (8, 4, 128, 128)  # 524,288 draws, laid out like attention probabilities
  keep = np.asarray(hash_bits(jax.random.key(0), shape) < np.uint32(round(p * 2**32)))
  n = keep.size
  assert abs(keep.mean() - p) < 6 * np.sqrt(p * (1 - p) / n)
  centred = keep - keep.mean()
  for axis in range(len(shape)):  # neighbours along each axis are uncorrelated
    a = np.moveaxis(centred, axis, 0)
    corr = np.mean(a[1:] * a[:-1]) / np.var(keep)
    assert abs(corr) < 6 / np.sqrt(a[1:].size), (axis, corr)
  # Another key gives an unrelated mask: they agree at p^2 + (1-p)^2.
  other = np.asarray(hash_bits(jax.random.key(1), shape) < np.uint32(round(p * 2**32)))
  agree, want = np.mean(keep == other), p * p + (1 - p) ** 2
  assert abs(agree - want) < 6 * np.sqrt(want * (1 - want) / n)
  # The 32 bits are uniform: each bit is set half of the time.
  bits = np.asarray(hash_bits(jax.random.key(2), shape))
  for b in range(32):
    assert abs(np.mean((bits >> b) & 1) - 0.5) < 6 * np.sqrt(0.25 / n), b
  # Sub-blocks of the leading dims are not copies of each other.
  flat = keep.reshape(32, -1)
  same = np.mean(flat[:, None] == flat[None], axis=-1)[~np.eye(32, dtype=bool)]
  assert np.all(np.abs(same - want) < 6 * np.sqrt(want * (1 - want) / flat.shape[1]))


def test_hash_bits_of_a_block_are_that_block_of_the_whole():
  key, full = jax.random.key(4), (2, 3, 1, 12, 12)
  whole = np.asarray(hash_bits(key, full))
  for lo, hi in ((0, 4), (4, 8), (8, 12)):
    np.testing.assert_array_equal(
      np.asarray(hash_bits(key, (2, 3, 1, hi - lo, hi), (0, 0, 0, lo, 0), full)),
      whole[:, :, :, lo:hi, :hi],
    )


@pytest.mark.parametrize("prng", ["hash", "threefry"])
def test_blocked_attention_with_dropout_matches_unblocked(prng):
  """Query blocks that skip keys after them compute the same output and gradients, dropout
  masks included."""
  from model.attention import attend, make_mask

  rng = np.random.default_rng(2)
  b, l, heads, kv_heads, d = 2, 12, 4, 2, 8
  q, k, v = (
    jnp.asarray(rng.normal(size=(b, l, n, d)).astype(np.float32))
    for n in (heads, kv_heads, kv_heads)
  )
  seg = jnp.asarray([[1] * l, [0] * 2 + [1] * 5 + [2] * 5], jnp.int32)
  mask = make_mask(seg, seg, jnp.arange(l), jnp.arange(l))
  key = jax.random.key(6)
  real = (seg > 0)[:, :, None, None]  # padding queries see no key: their output is unused

  def f(blocks):  # jitted: op by op, the hash masks' many small ops each compile alone
    return jax.jit(
      jax.value_and_grad(
        lambda q, k, v: jnp.sum(
          real * jnp.sin(attend(q, k, v, mask, "xla", 0.3, key, prng, query_blocks=blocks))
        ),
        argnums=(0, 1, 2),
      )
    )(q, k, v)

  (base, g_base), (blocked, g_blocked) = f(1), f(4)
  np.testing.assert_allclose(blocked, base, rtol=1e-5)
  for a, c in zip(g_blocked, g_base):
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_hash_bits_refuse_blocks_beyond_32_bits():
  with pytest.raises(ValueError, match="2\\^32"):
    jax.eval_shape(lambda: hash_bits(jax.random.key(0), (2**17, 2**16)))
