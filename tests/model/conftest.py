"""Shared builders for model tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import preset
from model.transformer import Transformer

# The presets' init std of 0.02 leaves attention almost uniform: a RoPE position off by one
# moved the tiny model's logits by 1.3e-3. At 0.1 it moves them by 1.5, and attention still
# spreads (a query's largest weight averages 0.26 over 12 keys; 0.83 at std 0.3, nearly hard).
TEST_INIT_STD = 0.1


def build(name="tiny", seed=0, **overrides):
  """A model of a preset, initialised with TEST_INIT_STD unless overridden."""
  return Transformer(preset(name, **{"init_std": TEST_INIT_STD, **overrides}), rngs=nnx.Rngs(seed))


def tokens(b, l, vocab=256, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, size=(b, l)), jnp.int32)


def param_count(cfg) -> int:
  """Parameters of a model of `cfg`, from shapes alone (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
