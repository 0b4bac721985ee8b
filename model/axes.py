"""Logical axis names, shape letters, and activation sharding constraints by logical name.

Shape letters used in array names (e.g. `q_BxLxHxK`):
  B batch, L query length, T key/value length (cache slots), D d_model, H query heads,
  G key/value heads, R query heads per kv head (H / G), K head dim, F MLP width,
  V vocabulary, N layers, P prompt length.

Model code names axes only logically. Which mesh axis a logical axis maps to is decided by
rules installed from outside (train/partitioning.py) with `axis_rules`; without rules every
constraint is a no-op, so the model runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

# Parameter axes.
EMBED = "embed"
VOCAB = "vocab"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
LAYERS = "layers"
PARAM_AXES = (EMBED, VOCAB, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS)

# Activation axes.
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV_HEADS = "activation_kv_heads"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"
ACTIVATION_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB)

LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

_RULES: contextvars.ContextVar = contextvars.ContextVar("fromscratch_axis_rules", default=None)


@contextlib.contextmanager
def axis_rules(mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, object]]):
  """Within this context, `constrain` shards activations on `mesh` by `rules`."""
  token = _RULES.set((mesh, dict(rules)))
  try:
    yield
  finally:
    _RULES.reset(token)


@contextlib.contextmanager
def manual():
  """Within this context `constrain` is a no-op: for per-device code inside shard_map, whose
  arrays are already each device's own piece."""
  token = _RULES.set(None)
  try:
    yield
  finally:
    _RULES.reset(token)


def logical_to_spec(logical: Sequence[str | None], rules: dict) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; unmapped names are replicated."""
  return PartitionSpec(*(None if name is None else rules.get(name) for name in logical))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical names (no-op without rules)."""
  active = _RULES.get()
  if active is None:
    return x
  mesh, rules = active
  if len(logical) != x.ndim:
    raise ValueError(
      f"constrain got {len(logical)} axis names {tuple(logical)} for an array of rank {x.ndim}"
    )
  spec = logical_to_spec(logical, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
