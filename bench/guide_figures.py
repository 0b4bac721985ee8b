"""The guide's figures, from what the project makes: the loss curves of the addition demo's
stages and its plot of RL accuracy and KL (the runs `make demo` leaves in runs/addition,
rlhf/demo.py:plot), and how each layout places an MLP
weight and a batch on 8 devices (configs/sharding applied to the tiny model's logical axes,
read back from the shardings JAX builds).

.venv/bin/python -m bench.guide_figures [--runs runs/addition] [--out docs/guide/img]
"""

from __future__ import annotations

import argparse
import os
import shutil

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

LAYOUTS = ("dp", "fsdp", "tp", "fsdp_tp", "dp_fsdp_tp")
STAGES = {"pretrained": "pretraining", "sft": "SFT", "rm": "reward model", "dpo": "DPO"}


def loss_curves(runs: str, path: str) -> None:
  """Train and validation loss over steps for each stage of the demo that has a loss."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from train.metrics import read_metrics

  fig, axes = plt.subplots(2, 2, figsize=(8, 6))  # two by two: legible at a page's width
  for ax, (stage, title) in zip(axes.flat, STAGES.items()):
    rows = read_metrics(os.path.join(runs, stage, "metrics.jsonl"))
    for split, style in (("train", "-"), ("val", "o-")):
      points = [(r["step"], r["loss"]) for r in rows if r["split"] == split and "loss" in r]
      if points:
        ax.plot(*zip(*points), style, label=split, markersize=3)
    ax.set(title=title, xlabel="step", ylabel="loss")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def placements(name: str) -> tuple[dict, list, list]:
  """(mesh shape, [(rows, cols, devices)] of the first block's MLP up kernel (embed x mlp),
  [(rows, devices)] of a batch of 8 rows) under layout `name` on 8 CPU devices."""
  import jax
  from flax import nnx

  from model.config import preset
  from train import partitioning
  from train.weights import make_model

  layout = partitioning.load_layout(name)
  mesh = partitioning.make_mesh(layout, jax.devices()[:8])
  model = nnx.eval_shape(lambda: make_model("lm", preset("tiny", n_heads=8, n_kv_heads=8), 0))
  specs = partitioning.param_specs(nnx.split(model)[1], mesh, layout.rules)
  spec = nnx.to_pure_dict(specs)["blocks"][0]["mlp"]["up"]["kernel"]
  kernel = jax.sharding.NamedSharding(mesh, spec).devices_indices_map((64, 128))
  rules = partitioning.validate_rules(layout.rules, mesh)
  batch_spec = jax.sharding.PartitionSpec(rules.get(partitioning.BATCH_AXIS))
  batch = jax.sharding.NamedSharding(mesh, batch_spec).devices_indices_map((8,))

  def blocks(index_map, shape):
    out = {}
    for device, index in index_map.items():
      key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
      out.setdefault(key, []).append(device.id)
    return out

  return dict(mesh.shape), blocks(kernel, (64, 128)), blocks(batch, (8,))


def layout_diagram(path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  fig, axes = plt.subplots(2, len(LAYOUTS), figsize=(3.3 * len(LAYOUTS), 5.6))
  cmap = plt.get_cmap("tab10")
  for col, name in enumerate(LAYOUTS):
    shape, kernel, batch = placements(name)
    ax = axes[0, col]
    for k, (((r0, r1), (c0, c1)), devices) in enumerate(sorted(kernel.items())):
      ax.add_patch(Rectangle((c0, 64 - r1), c1 - c0, r1 - r0, color=cmap(k % 10), alpha=0.5))
      label = ",".join(map(str, sorted(devices)))
      ax.text((c0 + c1) / 2, 64 - (r0 + r1) / 2, label, ha="center", va="center", fontsize=7)
    mesh = " x ".join(f"{a} {n}" for a, n in shape.items() if n > 1) or "one device"
    ax.set(xlim=(0, 128), ylim=(0, 64), title=f"{name}\n({mesh})", xticks=[], yticks=[])
    ax.set_xlabel("mlp (128)")
    ax.set_ylabel("embed (64)")
    ax = axes[1, col]
    for k, (((r0, r1),), devices) in enumerate(sorted(batch.items())):
      ax.add_patch(Rectangle((0, 8 - r1), 1, r1 - r0, color=cmap(k % 10), alpha=0.5))
      label = ",".join(map(str, sorted(devices)))
      ax.text(0.5, 8 - (r0 + r1) / 2, label, ha="center", va="center", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 8), xticks=[], yticks=[], ylabel="batch rows (8)")
  axes[0, 0].annotate("an MLP kernel: which devices hold each block", (0, 1.25),
                      xycoords="axes fraction", fontsize=9)  # fmt: skip
  axes[1, 0].annotate("a batch: which devices read each block of rows", (0, 1.04),
                      xycoords="axes fraction", fontsize=9)  # fmt: skip
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs/addition", help="where `make demo` ran")
  parser.add_argument("--out", default="docs/guide/img")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  layout_diagram(os.path.join(args.out, "layouts.png"))
  if not os.path.isdir(args.runs):
    raise SystemExit(f"{args.runs} does not exist: run `make demo` first (9 minutes on 2 cores)")
  loss_curves(args.runs, os.path.join(args.out, "losses.png"))
  shutil.copyfile(os.path.join(args.runs, "rl.png"), os.path.join(args.out, "rl.png"))
  print(f"wrote layouts.png, losses.png and rl.png (the demo's own plot) in {args.out}")


if __name__ == "__main__":
  main()
