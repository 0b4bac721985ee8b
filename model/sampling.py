"""Jit-compiled sampling: one prefill of left-padded prompts, then decode over a KV cache."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import axes
from model.attention import KVCache
from model.logprobs import token_logprobs


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens. Static under jit: changing it recompiles, new weights do not."""

  max_new_tokens: int = 64  # tokens generated per prompt
  temperature: float = 1.0  # 0 means greedy
  top_k: int = 0  # keep the k most likely tokens; 0 keeps all
  top_p: float = 1.0  # keep the smallest set with this much probability; 1 keeps all
  eos_id: int | None = None  # stop a row after this token; None never stops early
  pad_id: int = 0  # written after a row stops

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f"SamplingConfig.max_new_tokens must be > 0, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")


class SampleOutput(NamedTuple):
  """Generated tokens (pad after a stop), the logprob of each under the sampling
  distribution's temperature (before top-k/top-p), and 1 where a token was generated."""

  tokens_BxN: jax.Array
  logprobs_BxN: jax.Array
  mask_BxN: jax.Array


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
  """Left-pads token lists to a common length: (tokens_BxP, mask_BxP) as numpy int32."""
  if any(len(p) == 0 for p in prompts):
    raise ValueError(
      "every prompt needs at least one token (an empty prompt has no position "
      "to continue from); add a BOS token"
    )
  length = max(len(p) for p in prompts) if length is None else length
  if any(len(p) > length for p in prompts):
    raise ValueError(f"a prompt is longer than the padded length {length}")
  tokens_BxP = np.full((len(prompts), length), pad_id, np.int32)
  mask_BxP = np.zeros((len(prompts), length), np.int32)
  for row, p in enumerate(prompts):
    tokens_BxP[row, length - len(p) :] = p
    mask_BxP[row, length - len(p) :] = 1
  return tokens_BxP, mask_BxP


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Sets logits outside the top-k and the top-p nucleus to -inf."""
  neg_inf = jnp.finfo(logits_BxV.dtype).min
  if top_k > 0 and top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, neg_inf)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    # The most likely token is always kept; others while the mass before them is < top_p.
    kept_BxV = before_BxV < top_p
    threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, neg_inf)
  return logits_BxV


def _pick(rng, logits_BxV, cfg: SamplingConfig):
  """One token per row and its logprob."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if cfg.temperature == 0.0:
    token_B = jnp.argmax(logits_BxV, axis=-1)
  else:
    scaled_BxV = logits_BxV / cfg.temperature
    token_B = jax.random.categorical(rng, filter_logits(scaled_BxV, cfg.top_k, cfg.top_p))
  token_B = token_B.astype(jnp.int32)
  return token_B, token_logprobs(logits_BxV, token_B, cfg.temperature)


# Layers and slots stay whole (every decode step writes one slot of every layer); rows are split
# as the batch's activations are and kv heads as attention's, so each device keeps the keys and
# values of the rows and heads it computes.
KV_CACHE_AXES = (None, axes.ACT_BATCH, axes.ACT_KV_HEADS, None, None)
PROMPT_AXES = (axes.ACT_BATCH, axes.ACT_LENGTH)


def _constrain_cache(cache: KVCache) -> KVCache:
  return cache._replace(
    k_NxBxGxTxK=axes.constrain(cache.k_NxBxGxTxK, KV_CACHE_AXES),
    v_NxBxGxTxK=axes.constrain(cache.v_NxBxGxTxK, KV_CACHE_AXES),
    segment_ids_BxT=axes.constrain(cache.segment_ids_BxT, (axes.ACT_BATCH, None)),
  )


def _prefill(model, prompt_BxP, prompt_mask_BxP, total_len: int):
  """Runs the prompts into a fresh cache of total_len slots: (last logits, next positions, cache)."""
  b, p = prompt_BxP.shape
  if total_len < p:
    raise ValueError(f"a cache of {total_len} slots cannot hold a prompt of length {p}")
  prompt_BxP = axes.constrain(prompt_BxP, PROMPT_AXES)
  prompt_mask_BxP = axes.constrain(prompt_mask_BxP.astype(jnp.int32), PROMPT_AXES)
  positions_BxP = jnp.maximum(jnp.cumsum(prompt_mask_BxP, axis=1) - 1, 0)
  cache = _constrain_cache(model.init_cache(b, total_len))
  logits_BxPxV, cache = model.decode(prompt_BxP, positions_BxP, prompt_mask_BxP, cache)
  return logits_BxPxV[:, -1], positions_BxP[:, -1] + 1, _constrain_cache(cache)


def _advance(model, token_B, pos_B, cache: KVCache):
  """Feeds one token per row at positions pos_B: (the next logits, the cache)."""
  ones_Bx1 = jnp.ones((token_B.shape[0], 1), jnp.int32)
  logits_Bx1xV, cache = model.decode(token_B[:, None], pos_B[:, None], ones_Bx1, cache)
  return logits_Bx1xV[:, 0], _constrain_cache(cache)


def prefill(graphdef, state, prompt_BxP, prompt_mask_BxP, total_len: int):
  """(last logits_BxV, KVCache of total_len slots) of left-padded prompts. Pure; jit it with
  graphdef and total_len static."""
  logits_BxV, _, cache = _prefill(
    nnx.merge(graphdef, state), prompt_BxP, prompt_mask_BxP, total_len
  )
  return logits_BxV, cache


def pick_and_advance(graphdef, state, logits_BxV, pos_B, cache, rng, i, cfg: SamplingConfig):
  """Step i of `generate` for live rows: picks from logits_BxV with the same key `generate` uses
  at step i and feeds the pick. Returns (token_B, logprob_B, next logits_BxV, pos_B + 1, cache)."""
  model = nnx.merge(graphdef, state)
  token_B, logprob_B = _pick(jax.random.fold_in(rng, i), logits_BxV, cfg)
  logits_BxV, cache = _advance(model, token_B, pos_B, cache)
  return token_B, logprob_B, logits_BxV, pos_B + 1, cache


def _repeat_rows(logits_BxV, pos_B, cache: KVCache, samples: int):
  """Each prompt's prefill state repeated `samples` times, consecutively."""
  rep = lambda x, axis: jnp.repeat(x, samples, axis=axis)
  cache = cache._replace(
    k_NxBxGxTxK=rep(cache.k_NxBxGxTxK, 1),
    v_NxBxGxTxK=rep(cache.v_NxBxGxTxK, 1),
    segment_ids_BxT=rep(cache.segment_ids_BxT, 0),
  )
  return rep(logits_BxV, 0), rep(pos_B, 0), _constrain_cache(cache)


def generate(
  graphdef, state, prompt_BxP, prompt_mask_BxP, rng, cfg: SamplingConfig, samples: int = 1
):
  """Samples continuations of left-padded prompts, `samples` per prompt (rows [i S, (i + 1) S)
  continue prompt i, whose prefill runs once). Pure; jit it with graphdef, cfg and samples
  static."""
  model = nnx.merge(graphdef, state)
  b, p = prompt_BxP.shape
  n = cfg.max_new_tokens
  mcfg = model.config
  if mcfg.position == "learned" and p + n > mcfg.max_seq_len:
    raise ValueError(
      f"prompt length {p} + max_new_tokens {n} exceeds the model's "
      f"max_seq_len {mcfg.max_seq_len} (learned positions)"
    )
  logits_BxV, pos_B, cache = _prefill(model, prompt_BxP, prompt_mask_BxP, p + n)
  if samples > 1:
    logits_BxV, pos_B, cache = _repeat_rows(logits_BxV, pos_B, cache, samples)
    b *= samples

  def cond(carry):
    i, _, _, done_B, *_ = carry
    return (i < n) & ~jnp.all(done_B)

  def body(carry):
    i, logits_BxV, pos_B, done_B, cache, tokens_BxN, logprobs_BxN, mask_BxN = carry
    token_B, logprob_B = _pick(jax.random.fold_in(rng, i), logits_BxV, cfg)
    live_B = ~done_B
    token_B = jnp.where(live_B, token_B, cfg.pad_id)
    tokens_BxN = tokens_BxN.at[:, i].set(token_B)
    logprobs_BxN = logprobs_BxN.at[:, i].set(jnp.where(live_B, logprob_B, 0.0))
    mask_BxN = mask_BxN.at[:, i].set(live_B.astype(jnp.int32))
    if cfg.eos_id is not None:
      done_B = done_B | (token_B == cfg.eos_id)
    logits_BxV, cache = _advance(model, token_B, pos_B, cache)
    return (i + 1, logits_BxV, pos_B + 1, done_B, cache, tokens_BxN, logprobs_BxN, mask_BxN)

  carry = (
    jnp.zeros((), jnp.int32),
    logits_BxV,
    pos_B,
    jnp.zeros((b,), bool),
    cache,
    jnp.full((b, n), cfg.pad_id, jnp.int32),
    jnp.zeros((b, n), jnp.float32),
    jnp.zeros((b, n), jnp.int32),
  )
  carry = jax.lax.while_loop(cond, body, carry)
  return SampleOutput(carry[5], carry[6], carry[7])


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _check_left_padded(prompt_mask_BxP) -> np.ndarray:
  prompt_mask_BxP = np.asarray(prompt_mask_BxP)
  if (
    prompt_mask_BxP.ndim != 2
    or not prompt_mask_BxP[:, -1].all()
    or np.any(np.diff(prompt_mask_BxP.astype(np.int32), axis=1) < 0)
  ):
    raise ValueError(
      "prompts must be left-padded: each mask row is zeros then ones, ending "
      "in a real token (use model.sampling.left_pad)"
    )
  return prompt_mask_BxP


class Sampler:
  """Compiles `generate` once per model structure and sampling config; weights are arguments.

  With a mesh, every compiled function runs inside `axes.axis_rules(mesh, rules)`: prompts and
  the KV cache are constrained by logical names, so they are laid out as the run's parameters
  are. The rules are fixed here, not read from the caller's context: jit caches its first
  trace, and rules active at a later call would not reach it. Without a mesh every constraint
  is a no-op, whatever the caller's context.

  `bucket`: `stream` left-pads prompts to a multiple of it (and sizes its cache to one), so a
  conversation that grows turn by turn compiles once per bucket, not once per turn.
  """

  def __init__(self, graphdef, mesh=None, rules=(), bucket: int = 64):
    if bucket <= 0:
      raise ValueError(f"Sampler bucket must be > 0, got {bucket}")
    self.graphdef, self.mesh, self.rules, self.bucket = graphdef, mesh, tuple(rules), bucket
    self._generate = jax.jit(
      self._in_rules(functools.partial(generate, graphdef)), static_argnames=("cfg", "samples")
    )
    self._prefill = jax.jit(
      self._in_rules(functools.partial(prefill, graphdef)), static_argnames=("total_len",)
    )
    self._step = jax.jit(
      self._in_rules(functools.partial(pick_and_advance, graphdef)),
      static_argnames=("cfg",),
      donate_argnames=("cache",),  # one cache lives at a time: update it in place
    )

  def _in_rules(self, fn):
    @functools.wraps(fn)
    def traced(*args, **kwargs):
      # axes.manual() turns constraints off: no mesh, no layout to hold arrays to.
      with axes.axis_rules(self.mesh, self.rules) if self.mesh is not None else axes.manual():
        return fn(*args, **kwargs)

    return traced

  def __call__(
    self, state, prompt_BxP, prompt_mask_BxP, rng, cfg: SamplingConfig, samples: int = 1
  ):
    """`samples` continuations of each prompt (rows [i S, (i + 1) S) are prompt i's), from one
    prefill per prompt."""
    if samples < 1:
      raise ValueError(f"samples per prompt must be >= 1, got {samples}")
    prompt_mask_BxP = _check_left_padded(prompt_mask_BxP)
    b = prompt_mask_BxP.shape[0]
    rows = _round_up(b, self._batch_split())
    if rows == b:
      return self._generate(state, prompt_BxP, prompt_mask_BxP, rng, cfg=cfg, samples=samples)
    # Rows are split over the batch's mesh axes: fill the batch with copies of the first
    # prompt (each row samples on its own) and return the rows asked for.
    fill = lambda x: np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[:1], rows - b, 0)])
    out = self._generate(
      state, fill(prompt_BxP), fill(prompt_mask_BxP), rng, cfg=cfg, samples=samples
    )
    return SampleOutput(*(x[: b * samples] for x in out))

  def _batch_split(self) -> int:
    """How many ways the rules split the batch on this mesh (1 without a mesh)."""
    if self.mesh is None:
      return 1
    entry = axes.logical_to_spec((axes.ACT_BATCH,), dict(self.rules))[0]
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([self.mesh.shape[m] for m in names]))

  def lower(self, state, prompt_BxP, prompt_mask_BxP, rng, cfg: SamplingConfig):
    return self._generate.lower(state, prompt_BxP, prompt_mask_BxP, rng, cfg=cfg)

  def prefill(self, state, prompt_BxP, prompt_mask_BxP, total_len: int):
    """(last logits_BxV, KVCache with total_len slots) of left-padded prompts, jitted."""
    prompt_mask_BxP = _check_left_padded(prompt_mask_BxP)
    return self._prefill(state, prompt_BxP, prompt_mask_BxP, total_len=total_len)

  def stream(self, state, prompt_1xP, prompt_mask_1xP, rng, cfg: SamplingConfig):
    """Yields the token ids sampled for one left-padded prompt, one at a time: the tokens
    `__call__` gives for the same rng and cfg, up to and including cfg.eos_id. The prompt is
    checked here; the prefill runs at the first `next`."""
    prompt_mask_1xP = _check_left_padded(prompt_mask_1xP)
    prompt_1xP = np.asarray(prompt_1xP, np.int32)
    if prompt_1xP.shape != prompt_mask_1xP.shape or prompt_1xP.shape[0] != 1:
      raise ValueError(
        f"stream samples one prompt: tokens and mask of shape (1, P), got "
        f"{prompt_1xP.shape} and {prompt_mask_1xP.shape}"
      )
    n, real = cfg.max_new_tokens, int(prompt_mask_1xP.sum())
    mcfg = nnx.merge(self.graphdef, state).config
    if mcfg.position == "learned" and real + n > mcfg.max_seq_len:
      raise ValueError(
        f"prompt length {real} + max_new_tokens {n} exceeds the model's "
        f"max_seq_len {mcfg.max_seq_len} (learned positions)"
      )
    # Left padding is invisible (masked keys, positions count real tokens only), so a prompt
    # padded to its bucket gives the tokens of the unpadded one.
    p = _round_up(prompt_1xP.shape[1], self.bucket)
    tokens_1xP = np.full((1, p), cfg.pad_id, np.int32)
    mask_1xP = np.zeros((1, p), np.int32)
    tokens_1xP[:, p - prompt_1xP.shape[1] :] = prompt_1xP
    mask_1xP[:, p - prompt_1xP.shape[1] :] = prompt_mask_1xP
    return self._stream(state, tokens_1xP, mask_1xP, real, rng, cfg)

  def _stream(self, state, tokens_1xP, mask_1xP, real, rng, cfg):  # the checks ran eagerly
    total_len = _round_up(tokens_1xP.shape[1] + cfg.max_new_tokens, self.bucket)
    logits_1xV, cache = self._prefill(state, tokens_1xP, mask_1xP, total_len=total_len)
    pos_1 = jnp.asarray([real], jnp.int32)
    # Only the picking fields are static in the step: a shorter reply budget does not recompile.
    step_cfg = dataclasses.replace(cfg, max_new_tokens=1, eos_id=None, pad_id=0)
    for i in range(cfg.max_new_tokens):
      token_1, _, logits_1xV, pos_1, cache = self._step(
        state, logits_1xV, pos_1, cache, rng, np.int32(i), cfg=step_cfg
      )
      token = int(token_1[0])
      yield token
      if token == cfg.eos_id:
        return
