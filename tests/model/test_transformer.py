"""The decoder: causality, packing, padding, KV cache, scan/remat equivalence, heads."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.attention import cache_prefixes
from model.config import preset
from model.transformer import ScalarModel, last_token_values
from tests.conftest import assert_trees_close
from tests.model.conftest import build, tokens
from train import losses

PRESETS = ["tiny", "tiny_gpt2"]


@pytest.mark.parametrize("name", PRESETS)
def test_causality_gradient_is_exactly_zero(name):
  """d logits[t] / d (embedding of the token at s) is exactly 0 for every s > t.

  Embeddings are untied here: a tied LM head reads every table row by design."""
  model = build(name, tie_embeddings=False)
  l = 8
  toks = jnp.arange(1, l + 1, dtype=jnp.int32)[None]  # distinct: one table row per position
  graphdef, params = nnx.split(model)

  # Compiled once (t traced): op by op, every position's backward pass compiles each op.
  grad_at = jax.jit(jax.grad(lambda p, t: nnx.merge(graphdef, p)(toks)[0, t].sum()))

  for t in range(l - 1):
    grads = grad_at(params, t)
    table_grad = np.asarray(grads["embed"]["table_VxD"][...])
    future_rows = table_grad[np.asarray(toks[0, t + 1 :])]
    assert np.all(future_rows == 0.0), f"position {t} depends on a later token"
    assert np.any(table_grad[np.asarray(toks[0, : t + 1])] != 0.0)
    if name == "tiny_gpt2":
      assert np.all(np.asarray(grads["pos_embed_SxD"][...])[t + 1 :] == 0.0)


@pytest.mark.parametrize("name", PRESETS)
def test_packed_segments_are_independent(name):
  model = jitted(build(name), lambda m, *args: m(*args))
  a, bdoc = tokens(1, 5, seed=1), tokens(1, 7, seed=2)
  packed = jnp.concatenate([a, bdoc], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 7])
  pos = jnp.array([list(range(5)) + list(range(7))])
  logits = model(packed, pos, seg)
  np.testing.assert_allclose(logits[:, :5], model(a), atol=1e-5)
  np.testing.assert_allclose(logits[:, 5:], model(bdoc), atol=1e-5)
  # Changing document 1 leaves document 2's logits bit-identical.
  other = packed.at[:, :5].set(tokens(1, 5, seed=9))
  np.testing.assert_array_equal(model(other, pos, seg)[:, 5:], logits[:, 5:])


@pytest.mark.parametrize("name", PRESETS)
def test_left_padding_does_not_change_real_logits(name):
  model = jitted(build(name), lambda m, *args: m(*args))
  real = tokens(1, 6, seed=3)
  padded = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), real], axis=1)
  mask = jnp.array([[0] * 4 + [1] * 6])
  pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  np.testing.assert_allclose(model(padded, pos, mask)[:, 4:], model(real), atol=1e-5)


@pytest.mark.parametrize("scan,bucket", [(False, 2), (True, 2), (False, 0)])
@pytest.mark.parametrize("name", PRESETS)
def test_kv_cache_decode_matches_full_forward(name, scan, bucket):
  """Prefill a left-padded prompt, then decode token by token: every step's logits equal the
  full forward pass's at that position. bucket 2 reads prefixes 6, 8 and 12 of the 12-slot
  cache (a switch between them); 0 reads all 12."""
  model = build(name, scan_layers=scan, kv_bucket=bucket)
  forward, decode = jitted(model, lambda m, *a: m(*a)), jitted(model, lambda m, *a: m.decode(*a))
  b, p, n = 2, 5, 7
  seq = tokens(b, p + n, seed=4)
  mask = jnp.ones((b, p + n), jnp.int32).at[0, :2].set(0)  # row 0 starts with 2 pad slots
  pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  full = forward(seq, pos, mask)
  cache = model.init_cache(b, p + n)
  logits, cache = decode(seq[:, :p], pos[:, :p], mask[:, :p], cache)
  np.testing.assert_allclose(logits[0, 2:], full[0, 2:p], atol=1e-4)
  np.testing.assert_allclose(logits[1], full[1, :p], atol=1e-4)
  for i in range(p, p + n):
    step, cache = decode(seq[:, i : i + 1], pos[:, i : i + 1], mask[:, i : i + 1], cache)
    np.testing.assert_allclose(step[:, 0], full[:, i], atol=1e-4, err_msg=f"step {i}")
  assert int(cache.index) == p + n


@pytest.mark.parametrize(
  "t,l,bucket",
  [(504, 1, 64), (504, 100, 64), (2048, 1, 64), (12, 5, 2), (10, 3, 1), (64, 1, 64), (7, 7, 2)],
)
def test_cache_prefixes_cover_every_length_within_1_5x(t, l, bucket):
  """Every count of slots a query block can need (l .. t) has a listed prefix that holds it,
  at most 1.5x longer (or the bucket itself), and t is always last: the whole cache is read
  only when nothing shorter would do within 1.5x."""
  lengths = cache_prefixes(t, l, bucket)
  assert lengths[-1] == t and lengths == sorted(set(lengths)) and min(lengths) >= l
  for need in range(l, t + 1):
    chosen = min(n for n in lengths if n >= need)  # what jnp.searchsorted picks
    # Only when even 1.5x need reaches past the cache may the whole cache be the pick.
    assert chosen <= max(1.5 * need, bucket) or 1.5 * need >= t, (need, chosen)
  assert cache_prefixes(t, l, 0) == [t]


@pytest.mark.parametrize("bucket,finite", [(2, True), (0, False)])
def test_decode_reads_only_the_prefix_it_needs(bucket, finite):
  """NaN values in cache slots 6 and later: with bucket 2, decoding up to slot 5 reads prefixes
  of exactly the 4, 6 and 6 slots it needs and matches the full forward pass; reading one slot
  more, or every slot (bucket 0), lets the NaNs through (0 x NaN)."""
  model = build("tiny", kv_bucket=bucket)
  decode = jitted(model, lambda m, *a: m.decode(*a))
  b, p, n = 2, 4, 2
  seq = tokens(b, p + n, seed=7)
  full = jitted(model, lambda m, *a: m(*a))(seq)
  cache = model.init_cache(b, 16)
  cache = cache._replace(v_NxBxGxTxK=cache.v_NxBxGxTxK.at[:, :, :, p + n :].set(jnp.nan))
  pos = jnp.broadcast_to(jnp.arange(p + n), (b, p + n))
  ones = jnp.ones((b, p + n), jnp.int32)
  logits, cache = decode(seq[:, :p], pos[:, :p], ones[:, :p], cache)
  steps = [logits]
  for i in range(p, p + n):
    step, cache = decode(seq[:, i : i + 1], pos[:, i : i + 1], ones[:, i : i + 1], cache)
    steps.append(step)
  got = jnp.concatenate(steps, axis=1)
  if finite:
    np.testing.assert_allclose(got, full, atol=1e-4)
  else:
    assert np.isnan(np.asarray(got)).all()


def _stack_unrolled(params_unrolled):
  """Per-layer params of an unrolled model stacked into the scanned layout."""
  pure = nnx.to_pure_dict(params_unrolled)
  blocks = [pure["blocks"][i] for i in sorted(pure["blocks"])]
  pure["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return pure


# Every pair of (model, remat, dropout) settings once: 12 of the 24 combinations.
@pytest.mark.parametrize(
  "name,remat,rate,prng",
  [
    ("tiny", "none", 0.0, "threefry"),
    ("tiny", "full", 0.2, "threefry"),
    ("tiny", "dots", 0.2, "rbg"),
    ("tiny", "none", 0.2, "hash"),
    ("tiny", "full", 0.2, "rbg"),
    ("tiny", "dots", 0.0, "threefry"),
    ("tiny_gpt2", "none", 0.2, "rbg"),
    ("tiny_gpt2", "full", 0.0, "threefry"),
    ("tiny_gpt2", "dots", 0.2, "hash"),
    ("tiny_gpt2", "full", 0.2, "hash"),
    ("tiny_gpt2", "none", 0.2, "threefry"),
    ("tiny_gpt2", "dots", 0.2, "threefry"),
  ],
)
def test_scan_and_remat_match_unrolled(name, remat, rate, prng):
  """With dropout too: each layer draws the same masks scanned or not, and the recomputation
  in the backward pass draws the forward pass's masks again."""
  drop = dict(dropout=rate, attention_dropout=rate, dropout_prng=prng)
  reference = build(name, **drop)
  variant = build(name, scan_layers=True, remat=remat, **drop)
  g_var, p_var = nnx.split(variant)
  nnx.replace_by_pure_dict(p_var, _stack_unrolled(nnx.state(reference)))
  g_ref, p_ref = nnx.split(reference)
  toks = tokens(2, 10, seed=5)
  rng = jax.random.key(4) if rate else None

  def loss(g, p):
    return jnp.mean(jnp.square(nnx.merge(g, p)(toks, dropout_rng=rng)))

  l_ref, grads_ref = jax.jit(jax.value_and_grad(lambda p: loss(g_ref, p)))(p_ref)
  l_var, grads_var = jax.jit(jax.value_and_grad(lambda p: loss(g_var, p)))(p_var)
  np.testing.assert_allclose(l_var, l_ref, rtol=1e-6)
  want = _stack_unrolled(grads_ref)
  got = nnx.to_pure_dict(grads_var)
  assert_trees_close(got, want)


@pytest.mark.parametrize("name", PRESETS)
def test_attention_query_blocks_train_like_one_block(name):
  """Scanned and rematerialised, with hash dropout everywhere: blocks that skip the keys after
  them give the same loss and gradients; with a KV cache they are off, and decode agrees."""
  drop = dict(
    dropout=0.1, attention_dropout=0.1, dropout_prng="hash", scan_layers=True, remat="dots"
  )
  one, four = build(name, **drop), build(name, attention_query_blocks=4, **drop)
  toks = tokens(2, 16, seed=10)

  def loss(m):
    g, p = nnx.split(m)
    return jax.jit(
      jax.value_and_grad(
        lambda p: jnp.mean(jnp.square(nnx.merge(g, p)(toks, dropout_rng=jax.random.key(3))))
      )
    )(p)

  (l1, g1), (l4, g4) = loss(one), loss(four)
  dots = lambda m: str(
    jax.make_jaxpr(lambda p: nnx.merge(nnx.graphdef(m), p)(toks))(nnx.state(m))
  ).count("dot_general")
  assert dots(four) - dots(one) == 2 * 3, "4 blocks: 8 attention matmuls per layer, not 2"
  np.testing.assert_allclose(l4, l1, rtol=1e-6)
  assert_trees_close(nnx.to_pure_dict(g4), nnx.to_pure_dict(g1))
  cache = four.init_cache(2, 16)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  logits, _ = four.decode(toks, pos, jnp.ones((2, 16), jnp.int32), cache)
  np.testing.assert_allclose(logits, four(toks), atol=1e-5)


def test_unrolled_remat_matches_plain():
  plain, rematted = build("tiny"), build("tiny", remat="full")
  toks = tokens(2, 8, seed=6)
  f = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(nnx.graphdef(m), p)(toks) ** 2)))(
    nnx.state(m)
  )
  assert_trees_close(nnx.to_pure_dict(f(rematted)), nnx.to_pure_dict(f(plain)))


def test_einsum_attention_path_equals_jax_dot_product_attention():
  ours, jax_dpa = build("tiny"), build("tiny", attention_impl="jax")
  toks = tokens(2, 12, seed=7)
  seg = jnp.array([[1] * 12, [0] * 3 + [1] * 4 + [2] * 5])
  np.testing.assert_allclose(
    ours(toks, None, seg)[1, 3:], jax_dpa(toks, None, seg)[1, 3:], atol=1e-5
  )
  np.testing.assert_allclose(ours(toks)[0], jax_dpa(toks)[0], atol=1e-5)


@pytest.mark.parametrize("prng", ["threefry", "rbg", "hash"])
@pytest.mark.parametrize("field", ["dropout", "attention_dropout"])
def test_dropout_only_with_rng_and_is_seeded(field, prng):
  model = build("tiny", dropout_prng=prng, **{field: 0.5})
  toks = tokens(1, 8, seed=8)
  np.testing.assert_array_equal(model(toks), model(toks))
  a = model(toks, dropout_rng=jax.random.key(1))
  np.testing.assert_array_equal(a, model(toks, dropout_rng=jax.random.key(1)))
  assert not np.allclose(a, model(toks, dropout_rng=jax.random.key(2)))
  assert not np.allclose(a, model(toks))


def test_scalar_model_reads_last_real_token():
  sm = ScalarModel(preset("tiny"), rngs=nnx.Rngs(0))
  toks = tokens(2, 6, seed=9)
  values = sm(toks)
  assert values.shape == (2, 6) and values.dtype == jnp.float32
  mask = jnp.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(
    last_token_values(values, mask), jnp.array([values[0, 2], values[1, 5]])
  )
  # The value is the head applied to the trunk's final hidden states, token by token.
  h, _ = sm.trunk.hidden(toks)
  head = np.asarray(sm.head.kernel[...])[:, 0]
  want = np.asarray(h) @ head + np.asarray(sm.head.bias[...])[0]
  np.testing.assert_allclose(values, want, atol=1e-5)
  assert not sm.trunk.has_lm_head
  with pytest.raises(ValueError, match="no LM head"):
    sm.trunk.logits(jnp.zeros((1, 1, 64)))


def test_exact_gelu_and_its_gradient_match_the_closed_form():
  """mlp='gelu_exact' is x * Phi(x), and its derivative Phi(x) + x * phi(x), against float64
  math.erf over the range activations take, tails included."""
  import math

  from model.layers import gelu

  x = np.concatenate([np.linspace(-12, 12, 4001), [-30.0, -1e-3, 0.0, 1e-3, 30.0]])
  x32 = jnp.asarray(x, jnp.float32)
  x = np.asarray(x32, np.float64)  # the same points the float32 function sees
  phi_cdf = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
  want = x * phi_cdf
  want_grad = phi_cdf + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
  got = np.asarray(jax.jit(lambda v: gelu(v, approximate=False))(x32), np.float64)
  got_grad = np.asarray(jax.jit(jax.grad(lambda v: gelu(v, approximate=False).sum()))(x32))
  # Within 1e-6 everywhere (a float32 ulp of 12 is 9.5e-7). For x < -2 the relative error
  # grows, as in torch's formula: 1 + erf(x / sqrt 2) cancels in float32, and reads 0 past -5.5.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  np.testing.assert_allclose(got[x >= -2], want[x >= -2], rtol=3e-6, atol=1e-7)
  np.testing.assert_allclose(got_grad, want_grad, rtol=0, atol=3e-7)
  # The tanh approximation is a different function: up to ~5e-4 away from the exact one.
  approx = np.asarray(gelu(x32, approximate=True), np.float64)
  assert 1e-4 < np.abs(approx - want).max() < 1e-3


def _dot_dtypes(jaxpr) -> set[str]:
  """'accumulation:operand' dtypes of every dot_general, in nested jaxprs (scan bodies) too."""
  out = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.add(f"{eqn.params.get('preferred_element_type')}:{eqn.invars[0].aval.dtype}")
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _dot_dtypes(sub)
  return out


def jitted(model, fn):
  """fn(model, *args) compiled once, with the model's parameters as a jit argument."""
  graphdef, params = nnx.split(model)
  compiled = jax.jit(lambda p, *args: fn(nnx.merge(graphdef, p), *args))
  return lambda *args: compiled(params, *args)


@pytest.mark.parametrize("name,scan", [("tiny", False), ("tiny_gpt2", False), ("tiny", True)])
def test_bfloat16_compute_matches_float32_at_bfloat16_precision(name, scan):
  """dtype=bfloat16 runs the matmuls in bf16 on float32 parameters (the gpt2_124m and llama_1b
  configs, the latter scanned): logits and the loss come back in float32, gradients in the
  parameters' float32, each within bf16's precision of the float32 model's; the KV cache is
  bf16 and decode agrees with the bf16 forward."""
  m32, m16 = build(name, scan_layers=scan), build(name, scan_layers=scan, dtype="bfloat16")
  toks = tokens(2, 16, seed=1)
  dots = _dot_dtypes(jax.make_jaxpr(lambda: m16(toks))().jaxpr)
  # Every matmul takes bf16 operands; the attention logits (QK^T) accumulate in float32.
  assert all(d.endswith(":bfloat16") for d in dots) and "float32:bfloat16" in dots, dots
  want, got = jitted(m32, lambda m, t: m(t))(toks), jitted(m16, lambda m, t: m(t))(toks)
  assert got.dtype == jnp.float32
  scale = float(jnp.abs(want).max())
  err = float(jnp.abs(got - want).max())
  # bf16 keeps 8 bits of mantissa: two layers of it put the logits 1.2-1.6% of their largest
  # magnitude from float32 (measured). Exactly equal would mean bf16 was never used.
  assert 0 < err < 0.05 * scale, (err, scale)

  batch = {
    "inputs": toks[:, :-1],
    "targets": toks[:, 1:],
    "positions": jnp.broadcast_to(jnp.arange(15), (2, 15)),
    "segment_ids": jnp.ones((2, 15), jnp.int32),
    "loss_mask": jnp.ones((2, 15)),
  }

  def grads(m):
    g, p = nnx.split(m)
    return jax.jit(jax.value_and_grad(lambda p: losses.lm_loss(nnx.merge(g, p), batch)[0]))(p)

  (l32, g32), (l16, g16) = grads(m32), grads(m16)
  assert l16.dtype == jnp.float32 and abs(float(l16) / float(l32) - 1) < 1e-2
  largest = max(float(jnp.linalg.norm(a)) for a in jax.tree.leaves(g32))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g32), jax.tree.leaves(g16)):
    where, size = jax.tree_util.keystr(path), float(jnp.linalg.norm(a))
    assert b.dtype == jnp.float32, where
    if size < 1e-6 * largest:  # zero in exact arithmetic (the key bias): rounding noise only
      assert float(jnp.linalg.norm(b)) < 1e-3 * largest, where
      continue
    # Every other leaf, small ones (norm scales, biases) included, within bf16's precision:
    # the worst measured was 2% (a key kernel).
    rel = float(jnp.linalg.norm(b - a)) / size
    assert rel < 0.05, (where, rel)

  cache = m16.init_cache(2, 16)
  assert cache.k_NxBxGxTxK.dtype == jnp.bfloat16
  pos, mask = jnp.broadcast_to(jnp.arange(16), (2, 16)), jnp.ones((2, 16), jnp.int32)
  decode = jitted(m16, lambda m, *a: m.decode(*a))
  _, cache = decode(toks[:, :8], pos[:, :8], mask[:, :8], cache)
  for i in range(8, 16):
    step, cache = decode(toks[:, i : i + 1], pos[:, i : i + 1], mask[:, i : i + 1], cache)
    np.testing.assert_allclose(step[:, 0], got[:, i], atol=0.01 * scale, err_msg=f"step {i}")
