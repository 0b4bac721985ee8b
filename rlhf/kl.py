"""KL estimators between the policy and the reference, and the KL coefficient's controllers."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

ESTIMATORS = ("k1", "k2", "k3")
CONTROLLERS = ("fixed", "adaptive")


def kl_estimate(logp_BxN, ref_logp_BxN, estimator: str = "k1"):
  """Per-token estimate of KL(pi || ref) from samples of pi, with d = logp - ref_logp (Schulman):
  k1 = d (unbiased, the one to put in a reward), k2 = d^2 / 2, k3 = exp(-d) - 1 + d (unbiased
  and never negative, but its gradient inside a loss is biased)."""
  d_BxN = logp_BxN - ref_logp_BxN
  if estimator == "k1":
    return d_BxN
  if estimator == "k2":
    return 0.5 * jnp.square(d_BxN)
  if estimator == "k3":
    return jnp.expm1(-d_BxN) + d_BxN
  raise ValueError(f"KL estimator {estimator!r} is unknown; choose one of {ESTIMATORS}")


@dataclasses.dataclass
class KLController:
  """The KL coefficient beta: fixed, or adapted toward a target KL (lm-human-preferences):
  e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon, where KL is the batch mean
  of each sequence's summed KL and n the episodes in the batch. Its state is one float, kept in
  every checkpoint so a resumed run goes on with the same beta."""

  beta: float
  kind: str = "fixed"
  target: float = 6.0
  horizon: int = 10000

  def __post_init__(self):
    if self.kind not in CONTROLLERS:
      raise ValueError(f"rlhf.kl_controller={self.kind!r} is unknown; choose one of {CONTROLLERS}")
    if self.beta < 0:
      raise ValueError(f"rlhf.beta must be >= 0, got {self.beta}")
    if self.kind == "adaptive" and (self.target <= 0 or self.horizon <= 0):
      raise ValueError(
        f"the adaptive KL controller needs rlhf.kl_target > 0 and rlhf.kl_horizon > 0, got "
        f"{self.target} and {self.horizon}"
      )

  def update(self, kl: float, n: int) -> float:
    """Moves beta after a batch of n episodes whose mean summed KL is `kl`; returns beta."""
    if self.kind == "adaptive":
      error = min(max(kl / self.target - 1.0, -0.2), 0.2)
      self.beta *= 1.0 + error * n / self.horizon
    return self.beta
