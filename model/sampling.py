"""Jit-compiled sampling: one prefill of left-padded prompts, then decode over a KV cache."""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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
    raise ValueError("every prompt needs at least one token (an empty prompt has no position "
                     "to continue from); add a BOS token")
  length = max(len(p) for p in prompts) if length is None else length
  if any(len(p) > length for p in prompts):
    raise ValueError(f"a prompt is longer than the padded length {length}")
  tokens_BxP = np.full((len(prompts), length), pad_id, np.int32)
  mask_BxP = np.zeros((len(prompts), length), np.int32)
  for row, p in enumerate(prompts):
    tokens_BxP[row, length - len(p):] = p
    mask_BxP[row, length - len(p):] = 1
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
    logprobs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    token_B = jnp.argmax(logits_BxV, axis=-1)
  else:
    scaled_BxV = logits_BxV / cfg.temperature
    logprobs_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
    token_B = jax.random.categorical(rng, filter_logits(scaled_BxV, cfg.top_k, cfg.top_p))
  token_B = token_B.astype(jnp.int32)
  return token_B, jnp.take_along_axis(logprobs_BxV, token_B[:, None], axis=-1)[:, 0]


def generate(graphdef, state, prompt_BxP, prompt_mask_BxP, rng, cfg: SamplingConfig):
  """Samples continuations of left-padded prompts. Pure; jit it with graphdef and cfg static."""
  model = nnx.merge(graphdef, state)
  b, p = prompt_BxP.shape
  n = cfg.max_new_tokens
  mcfg = model.config
  if mcfg.position == "learned" and p + n > mcfg.max_seq_len:
    raise ValueError(f"prompt length {p} + max_new_tokens {n} exceeds the model's "
                     f"max_seq_len {mcfg.max_seq_len} (learned positions)")
  prompt_mask_BxP = prompt_mask_BxP.astype(jnp.int32)
  positions_BxP = jnp.maximum(jnp.cumsum(prompt_mask_BxP, axis=1) - 1, 0)
  cache = model.init_cache(b, p + n)
  logits_BxPxV, cache = model.decode(prompt_BxP, positions_BxP, prompt_mask_BxP, cache)

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
    step_logits_Bx1xV, cache = model.decode(token_B[:, None], pos_B[:, None],
                                            jnp.ones((b, 1), jnp.int32), cache)
    return (i + 1, step_logits_Bx1xV[:, 0], pos_B + 1, done_B, cache, tokens_BxN,
            logprobs_BxN, mask_BxN)

  carry = (jnp.zeros((), jnp.int32), logits_BxPxV[:, -1], positions_BxP[:, -1] + 1,
           jnp.zeros((b,), bool), cache, jnp.full((b, n), cfg.pad_id, jnp.int32),
           jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.int32))
  carry = jax.lax.while_loop(cond, body, carry)
  return SampleOutput(carry[5], carry[6], carry[7])


class Sampler:
  """Compiles `generate` once per model structure and sampling config; weights are arguments."""

  def __init__(self, graphdef):
    self._generate = jax.jit(functools.partial(generate, graphdef), static_argnames=("cfg",))

  def __call__(self, state, prompt_BxP, prompt_mask_BxP, rng, cfg: SamplingConfig):
    prompt_mask_BxP = np.asarray(prompt_mask_BxP)
    if (prompt_mask_BxP.ndim != 2 or not prompt_mask_BxP[:, -1].all()
        or np.any(np.diff(prompt_mask_BxP.astype(np.int32), axis=1) < 0)):
      raise ValueError("prompts must be left-padded: each mask row is zeros then ones, ending "
                       "in a real token (use model.sampling.left_pad)")
    return self._generate(state, prompt_BxP, prompt_mask_BxP, rng, cfg=cfg)

  def lower(self, state, prompt_BxP, prompt_mask_BxP, rng, cfg: SamplingConfig):
    return self._generate.lower(state, prompt_BxP, prompt_mask_BxP, rng, cfg=cfg)
