"""Layout planner: per-device bytes of parameters, optimizer state and activations, from shapes.

Nothing is allocated and no device is needed: parameters come from nnx.eval_shape, the
optimizer state from jax.eval_shape, and shardings live on an AbstractMesh of N devices.

  python -m train.plan --preset=llama_7b --devices=8,64,256 --layouts=fsdp \\
      --config.data.batch_size=256 --config.data.seq_len=2048
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from model import axes, lora
from model.config import ModelConfig
from model.transformer import Transformer
from train import optim, partitioning
from train import step as steplib

LAYOUTS = ("dp", "fsdp", "tp", "fsdp_tp", "dp_fsdp_tp")


@functools.lru_cache(maxsize=8)
def abstract_params(cfg: ModelConfig):
  """The parameters as an nnx.State of ShapeDtypeStructs."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[1]


def _nbytes(shape, dtype, sharding: NamedSharding) -> int:
  return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def activation_bytes(
  cfg: ModelConfig, rows: int, seq_len: int, mesh_shape: Mapping[str, int], rules: Mapping
) -> int:
  """Estimated bytes one device keeps for the backward pass of one microbatch of `rows` rows.

  Per token, with c the compute dtype's bytes and each term divided by the mesh size its
  activation rule splits it over (batch for all, then embed/heads/kv_heads/mlp/vocab):
    layer = c * (4D [block input, both norm outputs, mid-block residual]
                 + 2HK [q, attention output] + 2GK [k, v] + 3F [gate, up, their product;
                 2F for GELU]) + 3 * 4 * H * L [the XLA path's float32 B*H*L*L attention
                 tensors, three a layer as measured below; cudnn (flash) keeps only a
                 log-sum-exp, 4 * H]
    head  = 2 * 4V [float32 logits and their softmax] + 3cD [embedding, final norm in/out]
  remat none: N * layer. full: N * cD (block inputs) + one layer being recomputed.
  dots: N * c(3D + HK + 2GK + 2F) (block input and the matmul outputs) + one layer.
  Against XLA:CPU's compiled temp bytes of a gradient (the tiny preset, 4 scanned layers,
  sequences of 256-1024), measured: temp is 0.97-1.17x this estimate for every remat policy
  (1.8-2.6x when one float32 L*L tensor a layer was counted). Unscanned, XLA:CPU's schedule
  ignores remat and keeps about what remat none keeps (docs/benchmarks.md).
  """

  def split(logical):
    return math.prod(mesh_shape[m] for m in partitioning._mesh_axes_of(rules.get(logical)))

  tokens = rows * seq_len / (split(axes.ACT_BATCH) * split(axes.ACT_LENGTH))
  c = cfg.compute_dtype.itemsize
  d, h, g, k, f, v = (
    cfg.d_model,
    cfg.n_heads,
    cfg.n_kv_heads,
    cfg.head_size,
    cfg.d_ff,
    cfg.vocab_size,
  )
  se, sh, sg, sm = (
    split(axes.ACT_EMBED),
    split(axes.ACT_HEADS),
    split(axes.ACT_KV_HEADS),
    split(axes.ACT_MLP),
  )
  mlp_width = 3 if cfg.gated else 2
  attn_LxL = 4 * h * (1 if cfg.attention_impl == "cudnn" else 3 * seq_len) / sh
  layer = c * (4 * d / se + 2 * h * k / sh + 2 * g * k / sg + mlp_width * f / sm) + attn_LxL
  if cfg.remat == "none":
    saved = cfg.n_layers * layer
  elif cfg.remat == "full":
    saved = cfg.n_layers * c * d / se + layer
  else:
    saved = cfg.n_layers * c * (3 * d / se + h * k / sh + 2 * g * k / sg + 2 * f / sm) + layer
  head = 2 * 4 * v / split(axes.ACT_VOCAB) + 3 * c * d / se
  return int(tokens * (saved + head))


def _group(path) -> str:
  """A parameter's name with layer indices dropped: one entry per kind of parameter."""
  return ".".join(
    str(getattr(p, "key", p)) for p in path if not isinstance(getattr(p, "key", None), int)
  )


def plan(
  cfg: ModelConfig,
  layout: partitioning.Layout | str,
  n_devices: int,
  batch: int,
  seq_len: int,
  grad_accum: int = 1,
  opt_cfg: optim.OptimConfig | None = None,
) -> dict:
  """Per-device memory of one layout on `n_devices`; raises PartitionError if it cannot work.

  Args:
    layout: a Layout or the name of a file in configs/sharding.
    batch: global rows per optimizer step (split into grad_accum microbatches).
  """
  if isinstance(layout, str):
    layout = partitioning.load_layout(layout)
  mesh = partitioning.abstract_mesh(layout, n_devices)
  rules = dict(layout.rules)
  state = abstract_params(cfg)
  specs = partitioning.param_specs(state, mesh, layout.rules)
  partitioning.check_batch_size(batch, mesh, layout.rules, grad_accum)

  params = nnx.to_pure_dict(state)
  shardings = nnx.to_pure_dict(partitioning.to_shardings(specs, mesh))
  leaves = jax.tree_util.tree_leaves_with_path(params)
  sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  param_bytes = sum(_nbytes(p.shape, p.dtype, s) for (_, p), s in zip(leaves, sharding_leaves))
  total_bytes = sum(p.size * p.dtype.itemsize for _, p in leaves)
  # With LoRA only the adapters (and heads) have gradients and optimizer state.
  trainable = lora.trains if cfg.lora_rank else None
  trained, _ = steplib.trained_part(params, trainable)
  trained_shardings, _ = steplib.trained_part(shardings, trainable)
  grad_bytes = sum(
    _nbytes(p.shape, p.dtype, s)
    for p, s in zip(
      jax.tree.leaves(trained),
      jax.tree.leaves(trained_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)),
    )
  )

  opt_cfg = opt_cfg or optim.OptimConfig()
  abstract_opt = jax.eval_shape(optim.make_optimizer(opt_cfg, trained).init, trained)
  opt_shardings = partitioning.opt_state_shardings(abstract_opt, trained_shardings, mesh)
  opt_leaves = jax.tree.leaves(abstract_opt)
  opt_bytes = sum(
    _nbytes(x.shape, x.dtype, s)
    for x, s in zip(
      opt_leaves, jax.tree.leaves(opt_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    )
  )
  rows = batch // grad_accum
  act = activation_bytes(cfg, rows, seq_len, mesh.shape, rules)

  groups = {}
  for (path, p), s in zip(leaves, sharding_leaves):
    name = _group(path)
    if name in groups:
      groups[name]["count"] += 1
      continue
    logical = _logical_axes(state, path)
    groups[name] = {
      "shape": tuple(p.shape),
      "axes": logical,
      "spec": s.spec,
      "shard": tuple(s.shard_shape(tuple(p.shape))),
      "count": 1,
    }
  return {
    "layout": layout.name,
    "devices": n_devices,
    "mesh": dict(mesh.shape),
    "n_params": sum(p.size for _, p in leaves),
    "n_trained": sum(p.size for p in jax.tree.leaves(trained)),
    "param_bytes_total": total_bytes,
    "param_bytes": param_bytes,
    "grad_bytes": grad_bytes,
    "opt_bytes": opt_bytes,
    "opt_bytes_total": sum(x.size * x.dtype.itemsize for x in opt_leaves),
    "activation_bytes": act,
    "microbatch_rows": rows,
    "rows_per_device": rows // partitioning.batch_divisor(mesh, layout.rules),
    "total_bytes": param_bytes + grad_bytes + opt_bytes + act,
    "groups": groups,
    "args": (layout, n_devices, batch, seq_len, grad_accum, opt_cfg),
  }


def _logical_axes(state, path) -> tuple:
  node = state
  for p in path:
    node = node[getattr(p, "key", p)]
  return tuple(node.get_metadata().get("out_sharding") or ())


def _size(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"


def format_plan(p: dict, cfg: ModelConfig) -> str:
  mesh = " ".join(f"{a}={n}" for a, n in p["mesh"].items())
  lines = [
    f"{p['layout']} on {p['devices']} devices (mesh {mesh}): "
    f"{p['microbatch_rows']} rows per microbatch, {p['rows_per_device']} per device",
    f"  params       {_size(p['param_bytes']):>12} /device  "
    f"(of {_size(p['param_bytes_total'])}, {p['param_bytes_total'] / p['param_bytes']:.1f}x"
    f" split)",
    f"  grads        {_size(p['grad_bytes']):>12} /device",
    f"  optimizer    {_size(p['opt_bytes']):>12} /device  "
    f"(AdamW mu+nu of {_size(p['opt_bytes_total'])})",
    f"  activations  {_size(p['activation_bytes']):>12} /device per microbatch "
    f"(estimate, remat={cfg.remat}, attention={cfg.attention_impl})",
    f"  total        {_size(p['total_bytes']):>12} /device",
  ]
  if cfg.lora_rank:
    full = plan(cfg.replace(lora_rank=0), *p["args"])
    lines.append(
      f"  LoRA r={cfg.lora_rank} on {','.join(cfg.lora_targets)}: {p['n_trained']:,} of "
      f"{p['n_params']:,} parameters train; full fine-tuning: grads "
      f"{_size(full['grad_bytes'])}, optimizer {_size(full['opt_bytes'])}, total "
      f"{_size(full['total_bytes'])} /device"
    )
  lines.append("  partition specs:")
  width = max(len(n) for n in p["groups"])
  lines.append(
    f"    {'parameter':<{width}} {'':>4} {'shape':<22} {'logical axes':<34} "
    f"{'partition spec':<28} -> per-device shard"
  )
  for name, g in p["groups"].items():
    times = f"x{g['count']}" if g["count"] > 1 else ""
    lines.append(
      f"    {name:<{width}} {times:>4} {str(g['shape']):<22} "
      f"{str(g['axes']):<34} {str(tuple(g['spec'])):<28} -> {g['shard']}"
    )
  return "\n".join(lines)


def report(
  cfg: ModelConfig,
  layouts: Sequence[partitioning.Layout | str],
  devices: Sequence[int],
  batch: int,
  seq_len: int,
  grad_accum: int = 1,
  opt_cfg: optim.OptimConfig | None = None,
) -> str:
  """The plan of every layout on every device count; a layout that cannot work is one line."""
  n = sum(p.size for p in jax.tree.leaves(nnx.to_pure_dict(abstract_params(cfg))))
  out = [
    f"model: {n / 1e9:.3f}B params, d_model {cfg.d_model}, {cfg.n_layers} layers, "
    f"heads {cfg.n_heads}/{cfg.n_kv_heads}, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, "
    f"params {cfg.param_dtype}, compute {cfg.dtype}; batch {batch} x seq {seq_len}, "
    f"grad_accum {grad_accum}"
  ]
  for n_devices in devices:
    for layout in layouts:
      name = layout if isinstance(layout, str) else layout.name
      try:
        out.append(
          format_plan(plan(cfg, layout, n_devices, batch, seq_len, grad_accum, opt_cfg), cfg)
        )
      except partitioning.PartitionError as e:
        out.append(f"{name} on {n_devices} devices: ERROR {e}")
  return "\n".join(out)


def _main(argv):
  del argv
  from absl import flags
  from ml_collections import config_flags

  from model.config import preset

  config = flags.FLAGS.config
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  if flags.FLAGS.preset:
    fields = dataclasses.asdict(preset(flags.FLAGS.preset))
    fields.update({k[len("model.") :]: v for k, v in overrides.items() if k.startswith("model.")})
  else:
    fields = dict(config.model)
    if not fields.get("vocab_size"):
      fields["vocab_size"] = config.data.vocab_size  # the tokenizer's size (sentencepiece)
  cfg = ModelConfig(**fields)
  known = {f.name for f in dataclasses.fields(optim.OptimConfig)}
  opt_fields = {k: v for k, v in config.opt.items() if k in known}
  opt_fields["total_steps"] = opt_fields.get("total_steps") or 1
  opt_cfg = optim.OptimConfig(**opt_fields)
  chosen, sizes, _ = partitioning.split_mesh_config(config.mesh)
  # --config.mesh.* sizes belong to --config.mesh.layout, as in training; others use their file's.
  layouts = [
    partitioning.load_layout(name, sizes if name == chosen else None)
    for name in flags.FLAGS.layouts
  ]
  print(
    report(
      cfg,
      layouts,
      [int(n) for n in flags.FLAGS.devices],
      config.data.batch_size,
      config.data.seq_len,
      opt_cfg.grad_accum,
      opt_cfg,
    )
  )


def main():
  from absl import flags

  from train import cli

  base = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "base.py"
  )
  cli.define_config("config", base, "experiment config file (default: base)")
  flags.DEFINE_list("devices", ["8"], "device counts to plan for (may exceed this machine's)")
  flags.DEFINE_list("layouts", list(LAYOUTS), "layouts from configs/sharding to plan")
  flags.DEFINE_string(
    "preset",
    "",
    "model preset (model/config.py) instead of config.model; "
    "--config.model.* flags still apply on top",
  )
  cli.run(_main)


if __name__ == "__main__":
  main()
