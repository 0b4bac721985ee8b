"""Building blocks: dense layers, embeddings, norms, MLPs and dropout, each with logical axes."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.config import ModelConfig


def param(rngs: nnx.Rngs | jax.Array | None, init, shape, dtype, logical: Sequence[str | None]):
  """A parameter that carries logical axis names; shardings are applied by the caller's jit.
  `rngs`: the Rngs to draw a key from, a key, or None for an init without one."""
  if rngs is None:
    value = init(shape, dtype)
  else:
    value = init(rngs.params() if isinstance(rngs, nnx.Rngs) else rngs, shape, dtype)
  return nnx.Param(value, out_sharding=tuple(logical), eager_sharding=False)


def normal(std: float):
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def _mix32(x: jax.Array) -> jax.Array:
  """lowbias32 (C. Wellons' hash prospector): a bijection of uint32 with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x21F0AAAD)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x735A2D97)
  return x ^ (x >> 15)


def hash_bits(
  key: jax.Array,
  shape: Sequence[int],
  offset: Sequence[int] | None = None,
  full_shape: Sequence[int] | None = None,
) -> jax.Array:
  """Pseudo-random uint32 per element: a keyed hash of the element's index.

  With `offset` and `full_shape`, the bits of the block at `offset` of an array of
  `full_shape`: a piece of the whole array's bits, so computing them blockwise changes nothing.

  The index is split into the last two dims (`inner`, a bijection within each block) and the
  leading ones (`outer`); both are hashed with words of `key` and combined by a final mix.
  Elementwise from iotas, so XLA computes the bits inside the fusion that uses them (no mask in
  memory, recomputed for free in the backward pass) and the partitioner gives every shard
  its own slice of the same global bits, whatever the sharding.
  """
  shape = tuple(shape)
  if (offset is None) != (full_shape is None):
    raise ValueError("hash_bits: give offset and full_shape together, or neither")
  full = shape if full_shape is None else tuple(full_shape)
  offset = (0,) * len(shape) if offset is None else tuple(offset)
  n_outer = max(len(full) - 2, 0)
  if math.prod(full[n_outer:]) > 2**32 or math.prod(full[:n_outer]) > 2**32:
    raise ValueError(
      f"hash_bits: shape {full} has more than 2^32 elements in its last two "
      "dims or in its leading dims"
    )
  k0, k1, k2 = jax.random.bits(key, (3,), jnp.uint32)

  def keyed_index(dims, k):
    # k * size + flat index (mod 2^32): a bijection of the index that depends on the key.
    # The 1-D index vectors pass an optimization barrier with the key, so neither JAX's scan nor
    # XLA hoists them out of a scanned layer as whole arrays of indices: the broadcasts stay in
    # the fusion that uses them, and the indices are made in registers.
    dims = tuple(dims)
    iotas, k = jax.lax.optimization_barrier(
      ([jnp.arange(shape[d], dtype=jnp.uint32) for d in dims], k)
    )
    idx = jnp.broadcast_to(k, shape)
    for d, iota in zip(dims, iotas):
      idx = (
        idx * jnp.uint32(full[d])
        + jax.lax.broadcast_in_dim(iota, shape, (d,))
        + jnp.asarray(offset[d]).astype(jnp.uint32)
      )
    return idx

  inner = _mix32(keyed_index(range(n_outer, len(shape)), k0))
  outer = _mix32(keyed_index(range(n_outer), k1) * jnp.uint32(0x9E3779B9))
  return _mix32((inner + outer) ^ k2)


_ADAPTERS_OFF: contextvars.ContextVar = contextvars.ContextVar(
  "fromscratch_adapters_off", default=False
)


@contextlib.contextmanager
def adapters_off():
  """Within this context (while tracing), LoRA adapters add nothing: a model with adapters
  computes its base weights' function. PPO, DPO and GRPO take their reference this way."""
  token = _ADAPTERS_OFF.set(True)
  try:
    yield
  finally:
    _ADAPTERS_OFF.reset(token)


_BATCH_SHARD: contextvars.ContextVar = contextvars.ContextVar(
  "fromscratch_batch_shard", default=None
)


@contextlib.contextmanager
def batch_shard(index, count: int):
  """Within this context every array's leading axis holds shard `index` (may be traced, e.g.
  `jax.lax.axis_index`) of `count` equal, contiguous shards of the batch. `dropout` then
  applies that shard's rows of the whole batch's mask, so per-device code inside shard_map
  drops exactly what the same step on one device would. Hash masks compute only those rows;
  jax.random masks (threefry, rbg) are drawn whole on every device and sliced."""
  token = _BATCH_SHARD.set((index, int(count)))
  try:
    yield
  finally:
    _BATCH_SHARD.reset(token)


def keep_mask(
  rng: jax.Array,
  rate: float,
  shape: Sequence[int],
  prng: str = "threefry",
  offset: Sequence[int] | None = None,
  full_shape: Sequence[int] | None = None,
) -> jax.Array:
  """Dropout's keep mask (True with probability 1 - rate), or its block at `offset` of the mask
  of `full_shape`.

  For prng 'threefry' and 'rbg' the draw is jax.random.bernoulli with the key's own generator
  (the key's type decides which), of the whole mask even for a block. 'hash' compares
  `hash_bits` with round(keep * 2^32), which XLA fuses into the select that applies it.
  """
  if (offset is None) != (full_shape is None):
    raise ValueError("keep_mask: give offset and full_shape together, or neither")
  if prng == "hash":
    threshold = min(round((1.0 - rate) * 2.0**32), 2**32 - 1)
    return hash_bits(rng, shape, offset, full_shape) < jnp.uint32(threshold)
  keep = jax.random.bernoulli(rng, 1.0 - rate, tuple(full_shape or shape))
  if offset is None:
    return keep
  return jax.lax.dynamic_slice(keep, tuple(offset), tuple(shape))


def dropout(
  x: jax.Array,
  rate: float,
  rng: jax.Array | None,
  prng: str = "threefry",
  offset: Sequence[int] | None = None,
  full_shape: Sequence[int] | None = None,
) -> jax.Array:
  """Inverted dropout; identity when rate is 0 or no rng is given (evaluation). With `offset`
  and `full_shape`, x is that block of a larger array and gets that block of its mask."""
  if rng is None or rate == 0.0:
    return x
  shard = _BATCH_SHARD.get()
  if shard is not None:  # x is rows [index * B, (index + 1) * B) of a batch of count * B rows
    index, count = shard
    offset = (0,) * x.ndim if offset is None else tuple(offset)
    full_shape = x.shape if full_shape is None else tuple(full_shape)
    offset = (index * full_shape[0] + offset[0],) + offset[1:]  # this shard's first row
    full_shape = (count * full_shape[0],) + full_shape[1:]
  keep = keep_mask(rng, rate, x.shape, prng, offset, full_shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Dense(nnx.Module):
  """Contracts the trailing `in_shape` dims of x with a kernel of shape in_shape + out_shape.

  The matmul runs on 2-D operands (all leading dims flattened): XLA:CPU's weight-gradient
  dots are markedly faster that way than as 3-D contractions.

  With `lora`, a LoRA adapter (Hu et al. 2021) of rank cfg.lora_rank adds
  (alpha / r) * dropout(x) @ lora_a @ lora_b. lora_a (in_shape + (r,)) starts uniform in
  +-1/sqrt(fan_in) as PEFT's, lora_b ((r,) + out_shape) at zero, so the adapted layer starts
  equal to the base. The adapters share the kernel's logical axes on their in and out dims.
  """

  def __init__(
    self,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    in_axes: Sequence[str],
    out_axes: Sequence[str],
    cfg: ModelConfig,
    *,
    rngs: nnx.Rngs,
    std: float | None = None,
    use_bias: bool | None = None,
    lora: bool = False,
  ):
    self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
    self.dtype = cfg.compute_dtype
    std = cfg.init_std if std is None else std
    key = rngs.params()  # the adapter's key derives from it: the stream is as without LoRA
    self.kernel = param(
      key,
      normal(std),
      self.in_shape + self.out_shape,
      cfg.weight_dtype,
      tuple(in_axes) + tuple(out_axes),
    )
    use_bias = cfg.use_bias if use_bias is None else use_bias
    self.bias = (
      param(None, jnp.zeros, self.out_shape, cfg.weight_dtype, out_axes) if use_bias else None
    )
    on = lora and cfg.lora_rank > 0
    r, bound = cfg.lora_rank, 1.0 / math.sqrt(math.prod(self.in_shape))
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    a_shape, a_axes = self.in_shape + (r,), tuple(in_axes) + (None,)
    b_shape, b_axes = (r,) + self.out_shape, (None,) + tuple(out_axes)
    self.lora_a = (
      param(jax.random.fold_in(key, 1), uniform, a_shape, cfg.weight_dtype, a_axes) if on else None
    )
    self.lora_b = param(None, jnp.zeros, b_shape, cfg.weight_dtype, b_axes) if on else None
    self.lora_scale, self.lora_dropout = cfg.lora_alpha / max(r, 1), cfg.lora_dropout
    self.prng = cfg.dropout_prng

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    n_in = len(self.in_shape)
    lead = x.shape[: x.ndim - n_in]
    x_MxI = x.reshape(-1, math.prod(self.in_shape)).astype(self.dtype)
    w_IxO = self.kernel[...].reshape(math.prod(self.in_shape), -1).astype(self.dtype)
    y_MxO = x_MxI @ w_IxO
    if self.lora_a is not None and not _ADAPTERS_OFF.get():
      a_IxR = self.lora_a[...].reshape(x_MxI.shape[1], -1).astype(self.dtype)
      b_RxO = self.lora_b[...].reshape(a_IxR.shape[1], -1).astype(self.dtype)
      x_in = x_MxI
      if rng is not None and self.lora_dropout:
        x_in = dropout(x.astype(self.dtype), self.lora_dropout, rng, self.prng).reshape(x_MxI.shape)
      y_MxO = y_MxO + (x_in @ a_IxR) @ b_RxO * jnp.asarray(self.lora_scale, self.dtype)
    if self.bias is not None:
      y_MxO = y_MxO + self.bias[...].reshape(-1).astype(self.dtype)
    return y_MxO.reshape(lead + self.out_shape)


class Embed(nnx.Module):
  """Token embedding table; `attend` reuses it as a tied output projection."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dtype = cfg.compute_dtype
    self.table_VxD = param(
      rngs,
      normal(cfg.init_std),
      (cfg.vocab_size, cfg.d_model),
      cfg.weight_dtype,
      (axes.VOCAB, axes.EMBED),
    )

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    return jnp.take(self.table_VxD[...], tokens_BxL, axis=0).astype(self.dtype)

  def attend(self, x_BxLxD: jax.Array) -> jax.Array:
    b, l, d = x_BxLxD.shape
    table_VxD = self.table_VxD[...].astype(self.dtype)
    return (x_BxLxD.reshape(b * l, d).astype(self.dtype) @ table_VxD.T).reshape(b, l, -1)


class Norm(nnx.Module):
  """LayerNorm or RMSNorm over the last axis (of `dim`, default d_model), computed in float32,
  multiplied by cfg.norm_offset + scale (Gemma stores its norms as 1 + w)."""

  def __init__(self, cfg: ModelConfig, dim: int = 0, axis: str = axes.EMBED, kind: str = ""):
    self.kind, self.eps, self.dtype = kind or cfg.norm, cfg.norm_eps, cfg.compute_dtype
    dim, self.offset = dim or cfg.d_model, cfg.norm_offset
    ones = lambda shape, dtype: jnp.full(shape, 1.0 - self.offset, dtype)  # scale 1 at init
    self.scale = param(None, ones, (dim,), cfg.weight_dtype, (axis,))
    use_bias = self.kind == "layernorm" and cfg.use_bias
    self.bias = param(None, jnp.zeros, (dim,), cfg.weight_dtype, (axis,)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    y = y * (scale + self.offset if self.offset else scale)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
  """GELU: GPT-2's tanh approximation, or exact as x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)),
  torch's formula. (jax.nn.gelu's exact form goes through erfc, about twice as slow on CPU.)"""
  if approximate:
    return jax.nn.gelu(x, approximate=True)
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


class MLP(nnx.Module):
  """GELU MLP (GPT-2's tanh approximation, or exact erf as torch's nn.GELU), SwiGLU (LLaMA)
  or GeGLU (Gemma: the gate through GELU's tanh approximation)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.kind = cfg.mlp
    d, f = cfg.d_model, cfg.d_ff
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2's scaled residual init
    lora = cfg.lora_on
    if cfg.gated:
      self.gate = Dense((d,), (f,), (axes.EMBED,), (axes.MLP,), cfg, rngs=rngs, lora=lora("gate"))
    self.up = Dense((d,), (f,), (axes.EMBED,), (axes.MLP,), cfg, rngs=rngs, lora=lora("up"))
    self.down = Dense(
      (f,), (d,), (axes.MLP,), (axes.EMBED,), cfg, rngs=rngs, std=out_std, lora=lora("down")
    )

  def __call__(self, x_BxLxD: jax.Array, lora_rng: jax.Array | None = None) -> jax.Array:
    """`lora_rng`: the key of the adapters' dropout while training."""
    rng = adapter_rngs(lora_rng, 3)
    if self.kind in ("swiglu", "geglu"):
      gate = self.gate(x_BxLxD, rng[0])
      gate = jax.nn.silu(gate) if self.kind == "swiglu" else gelu(gate, approximate=True)
      h_BxLxF = gate * self.up(x_BxLxD, rng[1])
    else:
      h_BxLxF = gelu(self.up(x_BxLxD, rng[1]), approximate=self.kind == "gelu")
    h_BxLxF = axes.constrain(h_BxLxF, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
    return self.down(h_BxLxF, rng[2])


def adapter_rngs(rng: jax.Array | None, n: int) -> list:
  """n keys for n projections' adapter dropout (None each without a key)."""
  return [None] * n if rng is None else [jax.random.fold_in(rng, i) for i in range(n)]
