"""Full fine-tuning against LoRA on the 10M shape (configs/experiments/shakespeare_char_10m.py:
6 layers, width 384, sequences of 256): the train step's compiled memory (arguments, outputs,
temporaries), the bytes of parameters and optimizer state, and the median step time.

.venv/bin/python -m bench.lora [--rank 8] [--steps 5] [--batch 64]"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from configs.experiments import shakespeare_char_10m
from model import lora
from model.config import ModelConfig
from model.transformer import Transformer
from train import losses, optim, partitioning
from train import step as steplib


def measure(cfg: ModelConfig, batch: int, seq: int, steps: int) -> dict:
  layout = partitioning.load_layout("dp")
  mesh = partitioning.make_mesh(layout, jax.devices()[:1])
  opt_cfg = optim.OptimConfig(lr=1e-3, warmup_steps=0, total_steps=100)
  trainable = lora.trains if cfg.lora_rank else None
  graphdef, state, shardings, optimizer = steplib.init_sharded(
    lambda: Transformer(cfg, rngs=nnx.Rngs(0)), opt_cfg, mesh, layout.rules, 0, trainable=trainable
  )
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  data = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "loss_mask": np.ones((batch, seq), np.float32),
    "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    "segment_ids": np.ones((batch, seq), np.int32),
  }
  batch_shardings = {k: partitioning.batch_sharding(mesh, layout.rules) for k in data}
  step = steplib.jit_train_step(
    shardings,
    batch_shardings,
    graphdef=graphdef,
    loss_fn=losses.lm_loss,
    optimizer=optimizer,
    lr_schedule=optim.schedule(opt_cfg),
    mesh=mesh,
    rules=layout.rules,
    trainable=trainable,
  )
  sharded = partitioning.shard_batch(data, mesh, layout.rules)
  compiled = step.lower(state, sharded).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  times = []
  for _ in range(steps + 1):
    start = time.perf_counter()
    state, metrics = compiled(state, sharded)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
  return {
    "params": size(state.params),
    "trained": size(steplib.trained_part(state.params, trainable)[0]),
    "opt_state": size(state.opt_state),
    "arguments": memory.argument_size_in_bytes,
    "temporaries": memory.temp_size_in_bytes,
    "outputs": memory.output_size_in_bytes,
    "step_s": statistics.median(times[1:]),
    "gflops": cost.get("flops", 0.0) / 1e9,
    "loss": float(metrics["loss"]),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--targets", default="q,k,v,o")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--batch", type=int, default=64)
  args = p.parse_args()
  c = shakespeare_char_10m.get_config()
  fields = dict(c.model)
  fields["vocab_size"] = 65
  base = ModelConfig(**fields)
  seq = c.data.seq_len
  mib = lambda n: f"{n / 2**20:8.1f} MiB"
  rows = {}
  for name, cfg in (
    ("full", base),
    (f"LoRA r={args.rank}", base.replace(lora_rank=args.rank, lora_targets=args.targets)),
  ):
    rows[name] = r = measure(cfg, args.batch, seq, args.steps)
    print(
      f"{name:<10} trained {mib(r['trained'])} of {mib(r['params'])}; optimizer "
      f"{mib(r['opt_state'])}; compiled: arguments {mib(r['arguments'])}, temporaries "
      f"{mib(r['temporaries'])}, outputs {mib(r['outputs'])}; {r['gflops']:.0f} GFLOP (XLA's "
      f"count); step {r['step_s']:.2f} s "
      f"(median of {args.steps})",
      flush=True,
    )
  full, adapted = rows.values()
  peak = lambda r: r["arguments"] + r["temporaries"]
  print(
    f"LoRA / full: peak (arguments + temporaries) {peak(adapted) / peak(full):.2f}x, "
    f"FLOPs {adapted['gflops'] / full['gflops']:.2f}x, step time "
    f"{adapted['step_s'] / full['step_s']:.2f}x"
  )


if __name__ == "__main__":
  main()
