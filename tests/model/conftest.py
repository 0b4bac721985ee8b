"""Shared builders for model tests."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import preset
from model.transformer import Transformer


def build(name="tiny", seed=0, **overrides):
  """A model of a preset plus its (graphdef, params)."""
  model = Transformer(preset(name, **overrides), rngs=nnx.Rngs(seed))
  return model


def tokens(b, l, vocab=256, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, size=(b, l)), jnp.int32)
