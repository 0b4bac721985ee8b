"""Attention alone: forward and backward of `model.attention.attend` at a config's shape.

Times `jax.value_and_grad` of sum(attend(...)**2) over q, k and v for the einsum path with 1, 2, 4
and 8 query blocks and for jax.nn.dot_product_attention's XLA path ('jax'), without dropout and
with hash-mask dropout. Compile time apart; median of --runs calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from model.attention import attend, make_mask

SHAPES = {  # batch, length, heads, head dim
  "shakespeare_char_10m": (64, 256, 6, 64),
  "shakespeare_char": (6, 64, 4, 32),  # one of the baby's two devices
}


def time_path(shape, impl: str, blocks: int, rate: float, runs: int) -> float:
  b, l, h, k = shape
  keys = jax.random.split(jax.random.key(0), 3)
  q, kk, v = (jax.random.normal(key, (b, l, h, k)) for key in keys)
  seg = jnp.ones((b, l), jnp.int32)
  mask = make_mask(seg, seg, jnp.arange(l), jnp.arange(l))
  rng = jax.random.key(1) if rate else None

  def loss(q, kk, v):
    return jnp.sum(attend(q, kk, v, mask, impl, rate, rng, "hash", query_blocks=blocks) ** 2)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kk, v).compile()
  jax.block_until_ready(step(q, kk, v))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(step(q, kk, v))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--shape", default="shakespeare_char_10m", choices=SHAPES)
  ap.add_argument("--runs", type=int, default=5)
  args = ap.parse_args()
  shape = SHAPES[args.shape]
  print(
    f"{args.shape}: batch {shape[0]}, length {shape[1]}, {shape[2]} heads of {shape[3]}; "
    f"ms per forward+backward, median of {args.runs}"
  )
  print(f"{'path':<40}{'no dropout':>12}{'dropout 0.2':>13}")
  paths = [("jax.nn.dot_product_attention (jax)", "jax", 1)] + [
    (f"einsum, {n} query block{'s' if n > 1 else ''}", "xla", n) for n in (1, 2, 4, 8)
  ]
  for name, impl, blocks in paths:
    plain = time_path(shape, impl, blocks, 0.0, args.runs)
    # 'jax' has no dropout of its own: with dropout attend takes the einsum path.
    drop = "" if impl == "jax" else f"{time_path(shape, impl, blocks, 0.2, args.runs):13.1f}"
    print(f"{name:<40}{plain:12.1f}{drop:>13}")


if __name__ == "__main__":
  main()
