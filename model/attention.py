"""Causal self-attention: MHA/GQA/MQA, RoPE, segment and padding masks, and a KV cache."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.config import ModelConfig
from model.layers import Dense, Norm, adapter_rngs, dropout
from model.rope import frequencies, rope


class KVCache(NamedTuple):
  """Keys and values of every layer in preallocated slots, plus which slots hold what.

  segment_ids_BxT is 0 for slots that are empty or padding; `index` is the next slot to write.
  All rows write the same slot at each step (prompts are left-padded to a common length).
  """

  k_NxBxGxTxK: jax.Array
  v_NxBxGxTxK: jax.Array
  segment_ids_BxT: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    dtype = cfg.compute_dtype if dtype is None else dtype
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_size)
    return cls(
      jnp.zeros(shape, dtype),
      jnp.zeros(shape, dtype),
      jnp.zeros((batch, length), jnp.int32),
      jnp.zeros((), jnp.int32),
    )


def make_mask(
  q_segment_BxL: jax.Array,
  kv_segment_BxT: jax.Array,
  q_slot_L: jax.Array,
  kv_slot_T: jax.Array,
  window: int = 0,
) -> jax.Array:
  """True where a query may attend a key: same non-zero segment, key slot not in the future,
  and with a `window` > 0, fewer than `window` slots back (the query itself included).

  Slots order tokens in time (causality); segments separate packed documents and padding,
  so positions (which restart per document) never decide what is visible. A row's real
  tokens fill consecutive slots, so slot distance is token distance.
  """
  same_BxLxT = q_segment_BxL[:, :, None] == kv_segment_BxT[:, None, :]
  real_Bx1xT = (kv_segment_BxT != 0)[:, None, :]
  causal_LxT = kv_slot_T[None, :] <= q_slot_L[:, None]
  if window:
    causal_LxT = causal_LxT & (q_slot_L[:, None] - kv_slot_T[None, :] < window)
  return same_BxLxT & real_Bx1xT & causal_LxT[None]


def attend(
  q_BxLxHxK: jax.Array,
  k_BxTxGxK: jax.Array,
  v_BxTxGxK: jax.Array,
  mask_BxLxT: jax.Array,
  impl: str = "xla",
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
  dropout_prng: str = "threefry",
  query_blocks: int = 1,
) -> jax.Array:
  """Softmax attention with float32 logits.

  impl 'xla' is our einsum path; 'cudnn' and 'jax' call jax.nn.dot_product_attention (its cuDNN
  kernel, its XLA path). The einsum path runs in heads-major layout, (batch, kv head, query
  head in group, query, key), so each matmul has its batch dims leading and no operand or
  result of size B*H*L*T needs a transpose: on CPU its forward and backward take half to
  two thirds of the time of jax.nn.dot_product_attention's XLA path. With a dropout rng and
  rate > 0, probabilities are dropped (inverted scaling) after the softmax, on the einsum path.
  Rows with no visible key (padding queries) come out finite and are ignored downstream.

  query_blocks > 1 (einsum path, causal self-attention without a cache: query i and key i are
  the same slot; ignored unless it divides L == T) splits the queries into that many blocks,
  and block j attends only keys before its end. The softmax of each row is still over all its
  visible keys, so every row that has one gets the same result (padding rows differ), and the
  masked upper blocks are never computed (about 5/8 of the work with 4 blocks). Dropout masks
  are the same blocks of the whole masks.
  """
  b, l, h, k = q_BxLxHxK.shape
  g = k_BxTxGxK.shape[2]
  scale = 1.0 / math.sqrt(k)
  drop = dropout_rng is not None and dropout_rate > 0.0
  if impl in ("cudnn", "jax") and not drop:
    return jax.nn.dot_product_attention(
      q_BxLxHxK,
      k_BxTxGxK,
      v_BxTxGxK,
      mask=mask_BxLxT[:, None],
      scale=scale,
      implementation="xla" if impl == "jax" else impl,
    )
  q_BxGxRxLxK = q_BxLxHxK.reshape(b, l, g, h // g, k).transpose(0, 2, 3, 1, 4)
  k_BxGxTxK = k_BxTxGxK.transpose(0, 2, 1, 3)
  v_BxGxTxK = v_BxTxGxK.transpose(0, 2, 1, 3)
  t = k_BxGxTxK.shape[2]
  if t != l or l % query_blocks:
    query_blocks = 1  # the same result unblocked: blocks need L == T, split evenly
  full_shape = (b, g, h // g, l, t)
  big_neg = jnp.finfo(jnp.float32).min
  size = l // query_blocks
  outs = []
  for j in range(query_blocks):  # static: every block is its own pair of matmuls
    lo, hi = j * size, (j + 1) * size
    end = hi if query_blocks > 1 else t  # keys after the block's last query are never visible
    logits_BxGxRxLxT = (
      jnp.einsum(
        "bgrlk,bgtk->bgrlt",
        q_BxGxRxLxK[:, :, :, lo:hi],
        k_BxGxTxK[:, :, :end],
        preferred_element_type=jnp.float32,
      )
      * scale
    )
    logits_BxGxRxLxT = jnp.where(mask_BxLxT[:, None, None, lo:hi, :end], logits_BxGxRxLxT, big_neg)
    probs_BxGxRxLxT = jax.nn.softmax(logits_BxGxRxLxT, axis=-1)
    if drop:  # jax.random masks are drawn whole for each block; XLA keeps one copy (CSE)
      probs_BxGxRxLxT = dropout(
        probs_BxGxRxLxT, dropout_rate, dropout_rng, dropout_prng, (0, 0, 0, lo, 0), full_shape
      )
    outs.append(
      jnp.einsum(
        "bgrlt,bgtk->bgrlk", probs_BxGxRxLxT.astype(v_BxTxGxK.dtype), v_BxGxTxK[:, :, :end]
      )
    )
  out_BxGxRxLxK = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(b, l, h, k)


def cache_prefixes(t: int, l: int, bucket: int) -> list[int]:
  """Static prefix lengths of a t-slot cache that a query block of length l may read: bucket
  times 1, 1.5, 2, 3, 4, 6, 8, ... (each at most 1.5x the last), those >= l and < t, then t.
  bucket 0 gives [t]."""
  if bucket <= 0:
    return [t]
  lengths, power = set(), bucket
  while power < t:  # bucket * 2^i and bucket * 3 * 2^(i-1)
    lengths.update(n for n in (power, power * 3 // 2) if l <= n < t)
    power *= 2
  return sorted(lengths) + [t]


class Attention(nnx.Module):
  """Causal self-attention with grouped key/value heads."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
    self.impl, self.position = cfg.attention_impl, cfg.position
    if cfg.position == "rope":  # static: folded into the program as constants
      inv_freq, self.rope_factor = frequencies(cfg)
      self.inv_freq = tuple(float(f) for f in inv_freq)
    self.dropout_rate, self.dropout_prng = cfg.attention_dropout, cfg.dropout_prng
    self.query_blocks, self.kv_bucket = cfg.attention_query_blocks, cfg.kv_bucket
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    heads, kv_heads = (axes.HEADS, axes.HEAD_DIM), (axes.KV_HEADS, axes.HEAD_DIM)
    lora, bias = cfg.lora_on, cfg.use_bias or cfg.qkv_bias
    embed = (axes.EMBED,)
    self.q = Dense((d,), (h, k), embed, heads, cfg, rngs=rngs, use_bias=bias, lora=lora("q"))
    self.k = Dense((d,), (g, k), embed, kv_heads, cfg, rngs=rngs, use_bias=bias, lora=lora("k"))
    self.v = Dense((d,), (g, k), embed, kv_heads, cfg, rngs=rngs, use_bias=bias, lora=lora("v"))
    self.o = Dense((h, k), (d,), heads, embed, cfg, rngs=rngs, std=out_std, lora=lora("o"))
    # Qwen3's q/k norms: one RMSNorm over each head's vector, shared by the heads.
    self.q_norm = Norm(cfg, k, axes.HEAD_DIM, "rmsnorm") if cfg.qk_norm else None
    self.k_norm = Norm(cfg, k, axes.HEAD_DIM, "rmsnorm") if cfg.qk_norm else None

  def __call__(
    self,
    x_BxLxD: jax.Array,
    positions_BxL: jax.Array,
    mask_BxLxT: jax.Array,
    kv=None,
    index=None,
    dropout_rng=None,
    lora_rng=None,
  ):
    """Returns the attention output and, when `kv` = (k cache, v cache, layer) of all layers is
    given, the updated caches. `dropout_rng` (training only) drops attention probabilities,
    `lora_rng` the adapters' inputs."""
    rng = adapter_rngs(lora_rng, 4)
    q_BxLxHxK = self.q(x_BxLxD, rng[0])
    k_BxLxGxK = self.k(x_BxLxD, rng[1])
    v_BxLxGxK = self.v(x_BxLxD, rng[2])
    if self.q_norm is not None:
      q_BxLxHxK, k_BxLxGxK = self.q_norm(q_BxLxHxK), self.k_norm(k_BxLxGxK)
    if self.position == "rope":
      q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, self.inv_freq, self.rope_factor)
      k_BxLxGxK = rope(k_BxLxGxK, positions_BxL, self.inv_freq, self.rope_factor)
    q_BxLxHxK = axes.constrain(q_BxLxHxK, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, None))
    kv_names = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_KV_HEADS, None)

    def attend_keys(k_BxTxGxK, v_BxTxGxK, mask_BxLxT, query_blocks):
      k_BxTxGxK = axes.constrain(k_BxTxGxK, kv_names)
      v_BxTxGxK = axes.constrain(v_BxTxGxK, kv_names)
      return attend(
        q_BxLxHxK,
        k_BxTxGxK.astype(q_BxLxHxK.dtype),
        v_BxTxGxK.astype(q_BxLxHxK.dtype),
        mask_BxLxT,
        self.impl,
        self.dropout_rate,
        dropout_rng,
        self.dropout_prng,
        query_blocks,
      )

    if kv is None:
      out_BxLxHxK = attend_keys(k_BxLxGxK, v_BxLxGxK, mask_BxLxT, self.query_blocks)
      return self.o(out_BxLxHxK, rng[3]), None
    # One in-place write into the stacked cache of all layers, at (layer, slot `index`);
    # slicing a layer out and stacking it back would copy the whole cache every step.
    k_NxBxGxTxK, v_NxBxGxTxK, layer = kv
    start = (layer, 0, 0, index, 0)
    k_NxBxGxTxK = jax.lax.dynamic_update_slice(
      k_NxBxGxTxK, k_BxLxGxK.transpose(0, 2, 1, 3)[None].astype(k_NxBxGxTxK.dtype), start
    )
    v_NxBxGxTxK = jax.lax.dynamic_update_slice(
      v_NxBxGxTxK, v_BxLxGxK.transpose(0, 2, 1, 3)[None].astype(v_NxBxGxTxK.dtype), start
    )
    b, l = q_BxLxHxK.shape[:2]
    _, _, g, t, k = k_NxBxGxTxK.shape

    def prefix(length):  # attention over the first `length` slots of this layer's cache
      def run(k_NxBxGxTxK, v_NxBxGxTxK, mask_BxLxT):
        size, at = (1, b, g, length, k), (layer, 0, 0, 0, 0)
        # Back to (batch, slot, head) for attend, which transposes to heads-major again: the
        # two transposes cancel, and the einsums read the cache's own layout.
        return attend_keys(
          jax.lax.dynamic_slice(k_NxBxGxTxK, at, size)[0].transpose(0, 2, 1, 3),
          jax.lax.dynamic_slice(v_NxBxGxTxK, at, size)[0].transpose(0, 2, 1, 3),
          mask_BxLxT[:, :, :length],
          1,
        )  # queries are not the first slots of the keys

      return run

    # Keys after slot index + l - 1 are never visible, so only the shortest listed prefix
    # that holds them is read: decode time then grows with the filled slots, not the cache.
    lengths = cache_prefixes(t, l, self.kv_bucket)
    operands = (k_NxBxGxTxK, v_NxBxGxTxK, mask_BxLxT)
    if len(lengths) == 1:
      out_BxLxHxK = prefix(t)(*operands)
    else:
      which = jnp.searchsorted(jnp.asarray(lengths, jnp.int32), index + l)
      out_BxLxHxK = jax.lax.switch(
        which,
        [prefix(n) for n in lengths],  # clamps `which`
        *operands,
      )
    return self.o(out_BxLxHxK, rng[3]), (k_NxBxGxTxK, v_NxBxGxTxK)
