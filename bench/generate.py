"""Generation benchmark: tokens/s of the KV-cache Sampler against full-prefix recompute, same model."""

import os
import sys

if not __package__:  # run as `python bench/generate.py`: put the repo root on the path
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from model.config import ModelConfig, preset  # noqa: E402
from model.sampling import Sampler, SamplingConfig  # noqa: E402
from model.transformer import Transformer  # noqa: E402

# nanoGPT's shakespeare_char "baby" model (0.8M parameters). max_seq_len is 512, not nanoGPT's
# block size of 64, so that prompt + 500 new tokens fit the learned position table with no
# cropping: both paths then attend over the whole history.
BABY = ModelConfig(
  vocab_size=65,
  d_model=128,
  n_layers=4,
  n_heads=4,
  n_kv_heads=4,
  d_ff=512,
  max_seq_len=512,
  norm="layernorm",
  position="learned",
  mlp="gelu",
  use_bias=False,
  tie_embeddings=True,
)


def nocache_generate(graphdef, state, prompt_BxP, n):
  """Greedy decoding that reruns the full forward pass for every new token.

  The buffer has a static length P + n and is right-padded: the causal mask keeps the padding
  after the current position invisible, so the logits there equal those of the prefix alone.
  Static shapes mean one compile; the cost is a full-length forward every step (about twice
  the minimum causal-prefix work on average), which is what a jit-ed no-cache loop pays.
  """
  model = nnx.merge(graphdef, state)
  b, p = prompt_BxP.shape
  tokens_BxT = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(prompt_BxP)

  def body(i, tokens_BxT):
    logits_BxTxV = model(tokens_BxT)
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxTxV, p + i - 1, axis=1, keepdims=False)
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.lax.dynamic_update_slice(tokens_BxT, token_B[:, None], (0, p + i))

  tokens_BxT = jax.lax.fori_loop(0, n, body, tokens_BxT)
  return tokens_BxT[:, p:]


def timed(fn, runs):
  """Median wall seconds of `runs` calls, each blocked until the device is done."""
  seconds = []
  for _ in range(runs):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - t0)
  return statistics.median(seconds), seconds, out


def compile_timed(jitted, *args, **kwargs):
  """Ahead-of-time compile, timed apart from any run: (compiled executable, seconds)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  return compiled, time.perf_counter() - t0


def bench_batch(graphdef, state, vocab, batch, prompt_len, n, runs, rng, compare=True):
  """Compiles and times both paths at one batch size; asserts they pick the same tokens.
  compare=False times the cached path alone."""
  prompt_BxP = jax.random.randint(
    jax.random.fold_in(rng, batch), (batch, prompt_len), 0, vocab, jnp.int32
  )
  mask_BxP = jnp.ones_like(prompt_BxP)  # equal-length prompts: no left padding needed
  # Greedy on both paths so the tokens must match and the two do the same work.
  cfg = SamplingConfig(max_new_tokens=n, temperature=0.0)
  sampler = Sampler(graphdef)
  cached, cached_compile = compile_timed(sampler, state, prompt_BxP, mask_BxP, rng, cfg)
  cached_s, cached_all, out = timed(lambda: cached(state, prompt_BxP, mask_BxP, rng), runs)
  if not compare:
    return [("cached", batch, cached_compile, cached_s, cached_all)]
  nocache_jit = jax.jit(functools.partial(nocache_generate, graphdef), static_argnums=(2,))
  nocache, nocache_compile = compile_timed(nocache_jit, state, prompt_BxP, n)
  nocache_s, nocache_all, ref_BxN = timed(lambda: nocache(state, prompt_BxP), runs)
  cached_BxN = np.asarray(out.tokens_BxN)
  ref_BxN = np.asarray(ref_BxN)
  agree = (cached_BxN == ref_BxN).all(axis=1)
  if not agree.all():  # a raise, not an assert: the check must survive python -O
    raise SystemExit(
      f"batch {batch}: cached and no-cache greedy tokens differ in rows "
      f"{np.flatnonzero(~agree).tolist()}; the comparison would not be of equal "
      "work (or the KV cache is wrong)"
    )
  return [
    ("cached", batch, cached_compile, cached_s, cached_all),
    ("no-cache", batch, nocache_compile, nocache_s, nocache_all),
  ]


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument(
    "--preset",
    default="",
    help="a model/config.py preset instead of the baby "
    "model (its max_seq_len must hold prompt + new tokens)",
  )
  p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
  p.add_argument("--new_tokens", type=int, default=500)
  p.add_argument("--prompt_len", type=int, default=4)
  p.add_argument("--runs", type=int, default=3, help="timed calls per path; median reported")
  p.add_argument(
    "--kv_bucket",
    type=int,
    default=None,
    help="ModelConfig.kv_bucket for the "
    "cached path (0 reads every cache slot); default: the model's",
  )
  p.add_argument("--cached_only", action="store_true", help="time the cached path alone")
  args = p.parse_args()

  cfg = preset(args.preset) if args.preset else BABY
  if args.kv_bucket is not None:
    cfg = cfg.replace(kv_bucket=args.kv_bucket)
  if args.prompt_len + args.new_tokens > cfg.max_seq_len:
    raise SystemExit(
      f"prompt_len {args.prompt_len} + new_tokens {args.new_tokens} exceeds "
      f"max_seq_len {cfg.max_seq_len}"
    )
  graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  n_params = sum(x.size for x in jax.tree.leaves(state))
  print(
    f"model: {args.preset or 'baby (nanoGPT shakespeare_char shape)'}, "
    f"{n_params / 1e6:.2f}M params, max_seq_len {cfg.max_seq_len}, kv_bucket "
    f"{cfg.kv_bucket}; prompt "
    f"{args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; "
    f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} cpus"
  )
  rng = jax.random.key(0)
  # Rows print as each batch finishes: the no-cache runs at batch 16 take minutes on 2 cores.
  print(
    f"{'path':<9} {'batch':>5} {'compile s':>9} {'median s':>9} {'tokens/s':>10}  runs s",
    flush=True,
  )
  for batch in (int(b) for b in args.batches.split(",")):
    rate = {}
    for path, _, compile_s, median_s, all_s in bench_batch(
      graphdef,
      state,
      cfg.vocab_size,
      batch,
      args.prompt_len,
      args.new_tokens,
      args.runs,
      rng,
      compare=not args.cached_only,
    ):
      rate[path] = batch * args.new_tokens / median_s
      print(
        f"{path:<9} {batch:>5} {compile_s:>9.2f} {median_s:>9.3f} {rate[path]:>10,.0f}  "
        + " ".join(f"{s:.3f}" for s in all_s)
      )
    if args.cached_only:
      continue
    print(
      f"batch {batch}: cached / no-cache = {rate['cached'] / rate['no-cache']:.1f}x "
      "(greedy tokens identical)",
      flush=True,
    )


if __name__ == "__main__":
  main()
