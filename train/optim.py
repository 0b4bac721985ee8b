"""AdamW with masked weight decay, learning-rate schedules and global-norm clipping."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer settings; see configs/base.py for the meaning of each field."""

  lr: float = 3e-4
  final_lr: float = 3e-5
  warmup_steps: int = 100
  total_steps: int = 1000
  schedule: str = "cosine"
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_embeddings: bool = False
  clip_norm: float = 1.0
  grad_accum: int = 1

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(
        f"opt.schedule={self.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}"
      )
    if self.grad_accum < 1:
      raise ValueError(f"opt.grad_accum must be >= 1, got {self.grad_accum}")
    if self.warmup_steps < 0 or self.total_steps < 1:
      raise ValueError(
        f"opt.warmup_steps ({self.warmup_steps}) must be >= 0 and "
        f"opt.total_steps ({self.total_steps}) >= 1"
      )
    if self.lr <= 0 or self.final_lr < 0:
      raise ValueError(f"opt.lr must be > 0 and opt.final_lr >= 0, got {self.lr}, {self.final_lr}")


def schedule(cfg: OptimConfig) -> optax.Schedule:
  """nanoGPT's schedule: lr * (t + 1) / (warmup + 1) while warming up, then cosine or linear
  decay to final_lr at total_steps (constant: lr throughout after warmup)."""

  def lr_at(step):
    t = jnp.asarray(step, jnp.float32)
    warm = cfg.lr * (t + 1.0) / (cfg.warmup_steps + 1.0)
    frac = jnp.clip((t - cfg.warmup_steps) / max(cfg.total_steps - cfg.warmup_steps, 1), 0, 1)
    if cfg.schedule == "cosine":
      after = cfg.final_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * frac)) * (cfg.lr - cfg.final_lr)
    elif cfg.schedule == "linear":
      after = cfg.lr + frac * (cfg.final_lr - cfg.lr)
    else:
      after = jnp.asarray(cfg.lr, jnp.float32)
    return jnp.where(t < cfg.warmup_steps, warm, after)

  return lr_at


def decay_mask(params, decay_embeddings: bool):
  """True for matrices that weight decay applies to: kernels, and embeddings if asked.
  Norm scales and biases are never decayed."""

  def one(path, x):
    names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
    if "bias" in names or "scale" in names:
      return False
    if any("embed" in str(n) for n in names):
      return decay_embeddings
    return x.ndim >= 2

  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: OptimConfig, params) -> optax.GradientTransformation:
  return optax.chain(
    optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
    optax.adamw(
      schedule(cfg),
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=decay_mask(params, cfg.decay_embeddings),
    ),
  )
