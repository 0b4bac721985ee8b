"""Rollouts: left-padded prompts, sampled responses cut after their first EOS, and the whole
sequences that scoring and the updates read."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from model.sampling import Sampler, SamplingConfig


@dataclasses.dataclass
class Rollout:
  """One batch of episodes, on the host. Responses are left-aligned: a response's tokens, its
  EOS (when it stopped) and then PAD, which is never EOS."""

  tokens_BxL: np.ndarray  # prompt (left-padded) then response
  mask_BxL: np.ndarray  # 1 on real tokens: the prompt's and the response's through its EOS
  positions_BxL: np.ndarray  # cumsum(mask) - 1: positions count real tokens only
  response_mask_BxN: np.ndarray  # 1 on the response's tokens, its EOS included
  sampler_logprobs_BxN: np.ndarray  # the sampler's logprob of each response token
  eos_B: np.ndarray  # the response ended with EOS (not cut at the length limit)

  def device_batch(self) -> dict[str, np.ndarray]:
    """The arrays the trainer reads (names as rlhf/objectives.py expects them)."""
    return {
      "tokens": self.tokens_BxL,
      "positions": self.positions_BxL,
      "mask": self.mask_BxL,
      "response_mask": self.response_mask_BxN,
    }

  @property
  def response_tokens_BxN(self) -> np.ndarray:
    return self.tokens_BxL[:, -self.response_mask_BxN.shape[1] :]


def sequences(prompt_BxP, prompt_mask_BxP, response_BxN, response_mask_BxN):
  """(tokens, mask, positions) of prompt + response; positions = cumsum(mask) - 1, so a
  left-padded prompt's first real token is at position 0 (OpenRLHF #217)."""
  tokens = np.concatenate([prompt_BxP, response_BxN], axis=1).astype(np.int32)
  mask = np.concatenate([prompt_mask_BxP, response_mask_BxN], axis=1).astype(np.int32)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def sample(
  sampler: Sampler,
  params,
  prompt_BxP: np.ndarray,
  prompt_mask_BxP: np.ndarray,
  rng,
  cfg: SamplingConfig,
  samples: int = 1,
) -> Rollout:
  """Samples `samples` responses per prompt at cfg.temperature (rows [i S, (i + 1) S) answer
  prompt i, prefilled once). The sampler stops a row at its first cfg.eos_id and writes
  cfg.pad_id (distinct from EOS) after it, with mask 0."""
  if cfg.eos_id is None or cfg.eos_id == cfg.pad_id:
    raise ValueError(
      f"rollouts need an EOS distinct from PAD (eos {cfg.eos_id}, pad {cfg.pad_id}): with "
      f"PAD = EOS the end is masked out and the policy never learns to stop (TRL #3091)"
    )
  out = sampler(params, prompt_BxP, prompt_mask_BxP, rng, cfg, samples)
  response = np.asarray(jax.device_get(out.tokens_BxN))
  response_mask = np.asarray(jax.device_get(out.mask_BxN)).astype(np.int32)
  prompt_BxP, prompt_mask_BxP = (np.repeat(x, samples, 0) for x in (prompt_BxP, prompt_mask_BxP))
  tokens, mask, positions = sequences(prompt_BxP, prompt_mask_BxP, response, response_mask)
  eos = np.any((response == cfg.eos_id) & (response_mask > 0), axis=1)
  return Rollout(
    tokens, mask, positions, response_mask, np.asarray(jax.device_get(out.logprobs_BxN)), eos
  )
