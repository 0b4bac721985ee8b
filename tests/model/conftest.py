"""Shared builders for model tests."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import preset
from model.transformer import Transformer


# The presets' init std of 0.02 leaves attention almost uniform at init: a RoPE position off
# by one moved the tiny model's logits by only about 1e-3. At 0.3 it moves them by about 10
# (and the fp32 differences under test stay near 1e-5), so the tolerances below have margin.
TEST_INIT_STD = 0.3


def build(name="tiny", seed=0, **overrides):
  """A model of a preset, initialised with TEST_INIT_STD unless overridden."""
  return Transformer(preset(name, **{"init_std": TEST_INIT_STD, **overrides}),
                     rngs=nnx.Rngs(seed))


def tokens(b, l, vocab=256, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, size=(b, l)), jnp.int32)


def assert_trees_close(got, want, rtol=1e-5, floor=1e-7):
  """Leaf by leaf, within rtol of that leaf's largest magnitude: fp32 sums in another order
  differ relative to the tensor's scale, not to each entry (a near-zero entry may differ more
  than its own size). `floor` admits the rounding noise, about 1e-8, of a gradient that is zero
  in exact arithmetic: the key bias's, since softmax ignores a shift shared by a query's logits.
  At TEST_INIT_STD every other gradient leaf is above 0.005."""
  def check(path, a, b):
    scale = float(np.abs(np.asarray(b)).max())
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale + floor,
                               err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(check, got, want)

