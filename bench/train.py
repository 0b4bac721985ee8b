"""Training throughput: tokens/s, MFU and peak memory of our step vs a same-shape PyTorch peer."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

CONFIGS = ("shakespeare_char", "shakespeare_char_10m")


def _model_overrides(pairs: list[str]) -> dict:
  """['remat=full', 'scan_layers=True'] -> {'remat': 'full', 'scan_layers': True}."""
  import ast

  out = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise SystemExit(f"--model {pair!r}: expected FIELD=VALUE, e.g. remat=full")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def ours(
  config_name: str,
  steps: int,
  warmup: int,
  overrides: dict | None = None,
  devices: int = 0,
  grad_reduce: str = "",
) -> dict:
  """Our jitted train step on CPU with batches from the real data pipeline: on the config's
  CPU devices (distributed.local_device_count, data-parallel over all of them), or on
  `devices` of them when given."""
  import importlib

  import jax
  from flax import nnx

  from data import corpus
  from data.pipeline import pretrain_iterator
  from model.config import ModelConfig
  from model.transformer import Transformer
  from train import distributed, losses, metrics, optim, partitioning
  from train import step as steplib
  from train.stage import section

  config = importlib.import_module(f"configs.experiments.{config_name}").get_config()
  if devices:
    config.distributed.local_device_count = devices
  distributed.initialize(dict(config.distributed, coordinator="off"))
  n_dev = jax.device_count()
  data_cfg = section(corpus.DataConfig, config.data, "data")
  tok, train_dir, _ = corpus.build(
    data_cfg, f"/tmp/fromscratch_bench_{config_name}", progress=False
  )
  model_cfg = ModelConfig(**{**config.model, "vocab_size": tok.vocab_size, **(overrides or {})})
  opt_cfg = optim.OptimConfig(**dict(config.opt, total_steps=config.train.steps))
  layout = partitioning.load_layout("dp", {"data": n_dev})
  mesh = partitioning.make_mesh(layout, jax.devices())
  grad_reduce = "xla" if n_dev == 1 else (grad_reduce or config.mesh.grad_reduce)
  graphdef, state, shardings, optimizer = steplib.init_sharded(
    lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)), opt_cfg, mesh, layout.rules, 0, grad_reduce
  )
  it = pretrain_iterator(
    train_dir, seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size, seed=0
  )
  bsh = {
    k: partitioning.batch_sharding(mesh, layout.rules)
    for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")
  }
  step = steplib.jit_train_step(
    shardings,
    bsh,
    graphdef=graphdef,
    loss_fn=losses.lm_loss,
    optimizer=optimizer,
    lr_schedule=optim.schedule(opt_cfg),
    mesh=mesh,
    rules=layout.rules,
    grad_reduce=grad_reduce,
  )
  batches = [partitioning.shard_batch(next(it), mesh, layout.rules) for _ in range(8)]
  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  times, loss = [], None
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batches[i % len(batches)])
    loss = float(m["loss"])  # blocks: the step is done
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  tokens = data_cfg.batch_size * data_cfg.seq_len
  step_s = statistics.median(times)
  peak = metrics.measure_peak_flops()
  flops = metrics.flops_per_token(model_cfg, n_params, data_cfg.seq_len)
  variant = (
    f"remat {model_cfg.remat}{', scan' if model_cfg.scan_layers else ''}"
    f"{f', dp over {n_dev} devices, grad_reduce {grad_reduce}' if n_dev > 1 else ''}"
  )
  return {
    "impl": f"fromscratch ({variant})",
    "config": config_name,
    "params": n_params,
    "compile_s": compile_s,
    "step_ms": 1e3 * step_s,
    "tokens_per_s": tokens / step_s,
    "mfu": tokens / step_s * flops / peak,
    "peak_flops": peak,
    "xla_temp_mib": (mem.temp_size_in_bytes / 2**20) if mem else float("nan"),
    "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "loss": loss,
  }


def peer_model(model_cfg, vocab: int = 65, seed: int = 0):
  """nanoGPT's GPT in PyTorch with the shape of `model_cfg`: pre-LN blocks, no biases,
  learned positions, GELU MLP, tied head, SDPA attention; forward(idx, targets) -> loss."""
  import torch
  import torch.nn as nn
  import torch.nn.functional as F

  m = model_cfg

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln1 = nn.LayerNorm(m.d_model, bias=False)
      self.qkv = nn.Linear(m.d_model, 3 * m.d_model, bias=False)
      self.proj = nn.Linear(m.d_model, m.d_model, bias=False)
      self.ln2 = nn.LayerNorm(m.d_model, bias=False)
      self.fc = nn.Linear(m.d_model, m.d_ff, bias=False)
      self.out = nn.Linear(m.d_ff, m.d_model, bias=False)
      self.drop = nn.Dropout(m.dropout)

    def forward(self, x):
      b, t, _ = x.shape
      q, k, v = self.qkv(self.ln1(x)).split(m.d_model, dim=2)
      q, k, v = (z.view(b, t, m.n_heads, -1).transpose(1, 2) for z in (q, k, v))
      y = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, dropout_p=m.attention_dropout if self.training else 0.0
      )
      x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, m.d_model)))
      return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte = nn.Embedding(vocab, m.d_model)
      self.wpe = nn.Embedding(m.max_seq_len, m.d_model)
      self.blocks = nn.ModuleList([Block() for _ in range(m.n_layers)])
      self.ln = nn.LayerNorm(m.d_model, bias=False)
      self.drop = nn.Dropout(m.dropout)

    def forward(self, idx, targets, weights=None):
      x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])))
      for blk in self.blocks:
        x = blk(x)
      logits = self.ln(x) @ self.wte.weight.T
      nll = F.cross_entropy(logits.flatten(0, -2), targets.reshape(-1), reduction="none")
      if weights is None:
        return nll.mean()
      return (nll * weights.reshape(-1)).sum(), weights.sum()

  torch.manual_seed(seed)
  model = GPT()
  # nanoGPT's init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * layers).
  for name, p in model.named_parameters():
    if p.dim() >= 2:
      std = 0.02 / (2 * m.n_layers) ** 0.5 if name.endswith(("proj.weight", "out.weight")) else 0.02
      torch.nn.init.normal_(p, 0.0, std)
  return model


def peer(config_name: str, steps: int, warmup: int, compile_: bool) -> dict:
  """The peer model (see peer_model) trained with torch.optim.AdamW, eager or compiled."""
  import importlib

  import torch

  c = importlib.import_module(f"configs.experiments.{config_name}").get_config()
  m, d = c.model, c.data
  vocab = 65
  model = peer_model(m, vocab)
  opt = torch.optim.AdamW(
    model.parameters(), lr=c.opt.lr, betas=(c.opt.b1, c.opt.b2), weight_decay=c.opt.weight_decay
  )
  fwd = torch.compile(model) if compile_ else model
  gen = torch.Generator().manual_seed(0)
  xs = torch.randint(0, vocab, (8, d.batch_size, d.seq_len + 1), generator=gen)
  times, compile_s = [], 0.0
  for i in range(warmup + steps):
    x = xs[i % 8]
    t0 = time.perf_counter()
    loss = fwd(x[:, :-1], x[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), c.opt.clip_norm)
    opt.step()
    elapsed = time.perf_counter() - t0
    if i == 0:
      compile_s = elapsed
    if i >= warmup:
      times.append(elapsed)
  step_s = statistics.median(times)
  return {
    "impl": f"pytorch peer ({'torch.compile' if compile_ else 'eager'})",
    "config": config_name,
    "params": sum(p.numel() for p in model.parameters()),
    "compile_s": compile_s if compile_ else 0.0,
    "step_ms": 1e3 * step_s,
    "tokens_per_s": d.batch_size * d.seq_len / step_s,
    "mfu": float("nan"),
    "xla_temp_mib": float("nan"),
    "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "loss": float(loss),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--config", default="shakespeare_char", choices=CONFIGS)
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--impl", default="all", choices=("all", "ours", "eager", "compile"))
  ap.add_argument(
    "--devices", type=int, default=0, help="CPU devices for ours (data-parallel); 0: the config's"
  )
  ap.add_argument(
    "--grad-reduce",
    default="",
    choices=("", "xla", "flat"),
    help="ours: mesh.grad_reduce; '': the config's",
  )
  ap.add_argument(
    "--model",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="override a model field for ours, e.g. --model remat=full (repeatable)",
  )
  args = ap.parse_args()
  if args.impl == "all":  # each in its own process, so peak memory is each one's own
    rows = []
    for impl in ("ours", "eager", "compile"):
      out = subprocess.run(
        [
          sys.executable,
          "-m",
          "bench.train",
          "--config",
          args.config,
          "--steps",
          str(args.steps),
          "--warmup",
          str(args.warmup),
          "--impl",
          impl,
          "--devices",
          str(args.devices),
          "--grad-reduce",
          args.grad_reduce,
          *[f"--model={m}" for m in args.model],
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      )
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
      f"{'impl':<28}{'params':>10}{'compile s':>11}{'ms/step':>10}{'tokens/s':>11}"
      f"{'MFU':>8}{'max RSS MiB':>13}"
    )
    for r in rows:
      print(
        f"{r['impl']:<28}{r['params']:>10}{r['compile_s']:>11.2f}{r['step_ms']:>10.1f}"
        f"{r['tokens_per_s']:>11.0f}{r['mfu']:>8.1%}{r['max_rss_mib']:>13.0f}"
      )
    for r in rows[1:]:
      print(
        f"ours / {r['impl']}: tokens/s x{rows[0]['tokens_per_s'] / r['tokens_per_s']:.2f}, "
        f"peak memory x{rows[0]['max_rss_mib'] / r['max_rss_mib']:.2f}"
      )
    return
  if args.impl == "ours":
    print(
      json.dumps(
        ours(
          args.config,
          args.steps,
          args.warmup,
          _model_overrides(args.model),
          args.devices,
          args.grad_reduce,
        )
      )
    )
  else:
    print(json.dumps(peer(args.config, args.steps, args.warmup, args.impl == "compile")))


if __name__ == "__main__":
  main()
