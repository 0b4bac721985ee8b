"""The decoder: blocks, the stack (optionally scanned and rematerialised), LM and scalar heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.attention import Attention, KVCache, make_mask
from model.config import ModelConfig
from model.layers import MLP, Dense, Embed, Norm, dropout, normal, param

_REMAT_POLICIES = {
  "full": None,  # save nothing: recompute the whole block in the backward pass
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.rate, self.prng = cfg.dropout, cfg.dropout_prng
    self.lora_dropout = cfg.lora_rank > 0 and cfg.lora_dropout > 0
    self.attn_norm = Norm(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxT, kv=None, index=None, rng=None):
    rng_attn, rng_mlp, rng_probs = (None,) * 3 if rng is None else jax.random.split(rng, 3)
    # The adapters' dropout keys are folded in, so the other masks stay as without LoRA.
    rng_lora = jax.random.fold_in(rng, 3) if rng is not None and self.lora_dropout else None
    lora_attn, lora_mlp = (None, None) if rng_lora is None else jax.random.split(rng_lora)
    h_BxLxD, new_kv = self.attn(
      self.attn_norm(x_BxLxD), positions_BxL, mask_BxLxT, kv, index, rng_probs, lora_attn
    )
    x_BxLxD = x_BxLxD + dropout(h_BxLxD, self.rate, rng_attn, self.prng)
    h_BxLxD = self.mlp(self.mlp_norm(x_BxLxD), lora_mlp)
    x_BxLxD = x_BxLxD + dropout(h_BxLxD, self.rate, rng_mlp, self.prng)
    return axes.constrain(x_BxLxD, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)), new_kv


def _block_fn(graphdef, cfg: ModelConfig, positions_BxL, mask_BxLxT, index):
  """A pure function (block state, x, kv, rng) -> (x, kv), rematerialised as configured."""

  def apply(state, x_BxLxD, kv, rng):
    return nnx.merge(graphdef, state)(x_BxLxD, positions_BxL, mask_BxLxT, kv, index, rng)

  if cfg.remat == "none":
    return apply
  # Outside scan, XLA would merge the recomputation back into the forward pass (CSE) and
  # keep the activations after all; inside scan it cannot, and preventing CSE only costs.
  return jax.checkpoint(apply, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class Transformer(nnx.Module):
  """Decoder-only transformer. `lm_head=False` builds the trunk alone (for scalar heads)."""

  def __init__(
    self, cfg: ModelConfig, *, rngs: nnx.Rngs, lm_head: bool = True, value_head: bool = False
  ):
    self.config = cfg
    self.embed = Embed(cfg, rngs=rngs)
    if cfg.position == "learned":
      self.pos_embed_SxD = param(
        rngs,
        normal(cfg.init_std),
        (cfg.max_seq_len, cfg.d_model),
        cfg.weight_dtype,
        (None, axes.EMBED),
      )
    if cfg.scan_layers:

      @nnx.split_rngs(splits=cfg.n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: axes.LAYERS})
      def make_blocks(layer_rngs):
        return Block(cfg, rngs=layer_rngs)

      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = Norm(cfg)
    self.lm_head = (
      Dense(
        (cfg.d_model,),
        (cfg.vocab_size,),
        (axes.EMBED,),
        (axes.VOCAB,),
        cfg,
        rngs=rngs,
        use_bias=False,
      )
      if lm_head and not cfg.tie_embeddings
      else None
    )
    self.has_lm_head = lm_head
    # A policy that is its own critic (PPO with a shared trunk): a scalar head on the same
    # hidden states, at zero so the first advantages are the rewards themselves.
    self.value_head = (
      Dense((cfg.d_model,), (1,), (axes.EMBED,), (None,), cfg, rngs=rngs, std=0.0, use_bias=True)
      if value_head
      else None
    )

  def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
    return KVCache.zeros(self.config, batch, length, dtype)

  def hidden(
    self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, *, cache=None, dropout_rng=None
  ):
    """Final-normed hidden states, and the updated cache when one is given."""
    cfg = self.config
    b, l = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((b, l), jnp.int32)
    segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)
    if cache is None:
      index, kv_segment_BxT = None, segment_ids_BxL
      q_slot_L = kv_slot_T = jnp.arange(l)
    else:
      index = cache.index
      kv_segment_BxT = jax.lax.dynamic_update_slice(
        cache.segment_ids_BxT, segment_ids_BxL, (0, index)
      )
      q_slot_L = index + jnp.arange(l)
      kv_slot_T = jnp.arange(kv_segment_BxT.shape[1])
    mask_BxLxT = make_mask(segment_ids_BxL, kv_segment_BxT, q_slot_L, kv_slot_T, cfg.sliding_window)

    x_BxLxD = self.embed(tokens_BxL)
    if cfg.scale_embeddings:  # Gemma: by sqrt(d_model), rounded to the activations' dtype
      x_BxLxD = x_BxLxD * jnp.asarray(cfg.d_model**0.5, x_BxLxD.dtype)
    if cfg.position == "learned":
      x_BxLxD = x_BxLxD + jnp.take(self.pos_embed_SxD[...], positions_BxL, axis=0).astype(
        x_BxLxD.dtype
      )
    if dropout_rng is not None and cfg.dropout_prng == "rbg":
      # The same key, re-keyed for XLA's RngBitGenerator: masks cost about 4x less on CPU.
      dropout_rng = jax.random.wrap_key_data(
        jax.random.bits(dropout_rng, (4,), jnp.uint32), impl="rbg"
      )
    rng_embed, rng_layers = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    x_BxLxD = dropout(x_BxLxD, cfg.dropout, rng_embed, cfg.dropout_prng)
    x_BxLxD = axes.constrain(x_BxLxD, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
    layer_rngs = None if rng_layers is None else jax.random.split(rng_layers, cfg.n_layers)
    kv = None if cache is None else (cache.k_NxBxGxTxK, cache.v_NxBxGxTxK)

    if cfg.scan_layers:
      graphdef, state = nnx.split(self.blocks)
      fn = _block_fn(graphdef, cfg, positions_BxL, mask_BxLxT, index)

      def body(carry, xs):  # the cache rides in the carry so each layer updates it in place
        x_BxLxD, kv = carry
        layer_state, layer, rng = xs
        return fn(layer_state, x_BxLxD, None if kv is None else (*kv, layer), rng), None

      (x_BxLxD, new_kv), _ = jax.lax.scan(
        body, (x_BxLxD, kv), (state, jnp.arange(cfg.n_layers), layer_rngs)
      )
    else:
      new_kv = kv
      for i, block in enumerate(self.blocks):
        graphdef, state = nnx.split(block)
        fn = _block_fn(graphdef, cfg, positions_BxL, mask_BxLxT, index)
        x_BxLxD, new_kv = fn(
          state,
          x_BxLxD,
          None if new_kv is None else (*new_kv, i),
          None if layer_rngs is None else layer_rngs[i],
        )

    h_BxLxD = self.final_norm(x_BxLxD)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(new_kv[0], new_kv[1], kv_segment_BxT, index + l)
    return h_BxLxD, new_cache

  def logits(self, h_BxLxD: jax.Array) -> jax.Array:
    """LM logits in float32 (the loss and the sampler's softmax want full precision)."""
    if not self.has_lm_head:
      raise ValueError("this Transformer was built with lm_head=False and has no LM head")
    if self.lm_head is None:
      logits_BxLxV = self.embed.attend(h_BxLxD)
    else:
      logits_BxLxV = self.lm_head(h_BxLxD)
    logits_BxLxV = axes.constrain(logits_BxLxV, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))
    return logits_BxLxV.astype(jnp.float32)

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, *, dropout_rng=None):
    h_BxLxD, _ = self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL, dropout_rng=dropout_rng)
    return self.logits(h_BxLxD)

  def logits_and_values(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None):
    """LM logits and the value head's value per position, from one forward pass."""
    if self.value_head is None:
      raise ValueError("this Transformer was built without a value head (value_head=True)")
    h_BxLxD, _ = self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL)
    return self.logits(h_BxLxD), self.value_head(h_BxLxD)[..., 0].astype(jnp.float32)

  def decode(self, tokens_BxL, positions_BxL, segment_ids_BxL, cache: KVCache):
    """Runs L new tokens against the cache: (logits_BxLxV, updated cache)."""
    h_BxLxD, cache = self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL, cache=cache)
    return self.logits(h_BxLxD), cache


HEAD_INITS = ("reward", "zero")


class ScalarModel(nnx.Module):
  """The trunk with a scalar head: a value per token (value model) or read at the last real
  token with `last_token_values` (reward model). With cfg.num_classes = k, the head gives k
  logits per token instead (a classifier, read at the last real token alike)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, head_init: str = "reward"):
    if head_init not in HEAD_INITS:
      raise ValueError(f"head_init={head_init!r} is unknown; choose one of {HEAD_INITS}")
    self.config = cfg
    self.trunk = Transformer(cfg, rngs=rngs, lm_head=False)
    # A reward head starts at N(0, 1/sqrt(d+1)) (lm-human-preferences); a value head at zero,
    # so the first advantages are the rewards themselves.
    std = 1.0 / (cfg.d_model + 1) ** 0.5 if head_init == "reward" else 0.0
    self.classes = cfg.num_classes
    self.head = Dense(
      (cfg.d_model,),
      (max(self.classes, 1),),
      (axes.EMBED,),
      (None,),
      cfg,
      rngs=rngs,
      std=std,
      use_bias=True,
    )

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, *, dropout_rng=None):
    """[B, L] values, or [B, L, k] logits for a classifier."""
    h_BxLxD, _ = self.trunk.hidden(
      tokens_BxL, positions_BxL, segment_ids_BxL, dropout_rng=dropout_rng
    )
    out = self.head(h_BxLxD).astype(jnp.float32)
    return out if self.classes else out[..., 0]


def last_token_values(values_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """The value at each row's last position where mask is set (the reward of a sequence):
  [B] from [B, L], or [B, k] from [B, L, k] (a classifier's logits)."""
  l = values_BxL.shape[1]
  last_B = jnp.max(jnp.where(mask_BxL > 0, jnp.arange(l)[None, :], -1), axis=1)
  last_B = jnp.maximum(last_B, 0)
  index = last_B.reshape((-1, 1) + (1,) * (values_BxL.ndim - 2))
  return jnp.take_along_axis(values_BxL, index, axis=1)[:, 0]
