"""Metrics: TensorBoard scalars plus a JSONL log, model FLOPs and MFU, and the loss plot."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig


def matmul_params(cfg: ModelConfig, n_params: int) -> int:
  """Parameters that take part in a matmul per token: all but the lookup tables (the token
  table counts when it is also the tied LM head)."""
  lookup = cfg.max_seq_len * cfg.d_model if cfg.position == "learned" else 0
  if not cfg.tie_embeddings:
    lookup += cfg.vocab_size * cfg.d_model
  return n_params - lookup


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
  """Training FLOPs per token: 6N for the matmuls plus 12 * layers * (heads x head size) *
  seq_len for attention scores and values (the PaLM / nanoGPT estimate)."""
  width = cfg.n_heads * cfg.head_size  # d_model unless head_dim is set apart from it
  return 6.0 * matmul_params(cfg, n_params) + 12.0 * cfg.n_layers * width * seq_len


def measure_peak_flops(size: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a float32 matmul on the default device: the CPU's practical peak."""
  a = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2.0 * size**3 / float(np.median(times))


class StepClock:
  """Seconds spent stepping, with evaluation, checkpoints and samples left out.

  Steps run asynchronously: the host dispatches one while the device still runs the last, so
  a step counts as done only once the host has waited for its results. Call `reached(step)`
  right after that wait. Host work that should not count (evaluation, a checkpoint) runs
  between a `reached` and a `resumed()`. `take_window()` gives the steps and seconds since
  the previous call, for the logged rate. `total_steps` and `total_s` cover the whole run."""

  def __init__(self, step: int):
    self._t, self._step = time.perf_counter(), step
    self._window_steps, self._window_s = 0, 0.0
    self.total_steps, self.total_s = 0, 0.0

  def reached(self, step: int):
    now = time.perf_counter()
    n, seconds = step - self._step, now - self._t
    self._window_steps += n
    self._window_s += seconds
    self.total_steps += n
    self.total_s += seconds
    self._t, self._step = now, step

  def resumed(self):
    self._t = time.perf_counter()

  def take_window(self) -> tuple[int, float]:
    out = (self._window_steps, self._window_s)
    self._window_steps, self._window_s = 0, 0.0
    return out


def throughput(
  steps: int, seconds: float, tokens_per_step: int, flops_per_token: float, peak_flops: float
) -> dict:
  """tokens/s and MFU (None when unknown) of `steps` steps taking `seconds`."""
  if steps <= 0 or seconds <= 0:
    return {"tokens_per_s": None, "mfu": None}
  rate = steps * tokens_per_step / seconds
  return {"tokens_per_s": rate, "mfu": rate * flops_per_token / peak_flops if peak_flops else None}


class MetricsWriter:
  """Writes scalars to TensorBoard (when available) and to metrics.jsonl, on process 0."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, "a", buffering=1)
      if tensorboard:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict, prefix: str = "train"):
    if not self.active:
      return
    clean = {k: float(v) for k, v in scalars.items() if v is not None}
    self._file.write(json.dumps({"step": int(step), "split": prefix, **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(f"{prefix}/{k}", v, int(step))

  def text(self, step: int, tag: str, text: str):
    if self.active and self._tb is not None:
      self._tb.add_text(tag, text, int(step))

  def close(self):
    if self.active:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path: str, out_png: str) -> str:
  """Training and validation loss against step."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(metrics_path)
  fig, ax = plt.subplots(figsize=(7, 4))
  # Each loss a stage logs: "loss", or one per state ("policy/loss", "critic/loss").
  names = sorted({k for r in rows for k in r if k == "loss" or k.endswith("/loss")})
  for split, style in (("train", "-"), ("val", "o-")):
    for name in names:
      pts = [(r["step"], r[name]) for r in rows if r.get("split") == split and name in r]
      if pts:
        steps, losses = zip(*sorted(dict(pts).items()))
        label = split if name == "loss" else f"{split} {name}"
        ax.plot(steps, losses, style, label=label, markersize=4)
  ax.set_xlabel("step")
  ax.set_ylabel("loss" if names != ["loss"] else "loss (nats/token)")
  ax.grid(alpha=0.3)
  if names:
    ax.legend()
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)
  return out_png


def sum_eval(eval_step_fn, params, batches, mesh, max_batches: int = 0) -> dict:
  """Sums of eval_step's outputs over host batches (each this process's rows), pairs summed
  member by member."""
  totals = None
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    out = jax.device_get(eval_step_fn(params, mesh.shard(batch)))
    out = jax.tree.map(float, out)
    totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
  return totals or {"loss_sum": 0.0, "count": 0.0}


def pair_eval_result(totals: dict, loss_name: str) -> dict:
  """A pairwise stage's evaluation (reward model, DPO): every sum per pair, the loss under
  `loss_name` (not "loss": the loop reads that as an LM's, with a perplexity), and the count."""
  totals = dict(totals)
  pairs = totals.pop("count", 0.0)
  result = {k.replace("loss_sum", loss_name): v / max(pairs, 1.0) for k, v in totals.items()}
  return {**result, "pairs": pairs}


def lm_eval_result(totals: dict) -> dict:
  """An LM's evaluation from summed eval outputs: the loss without z-loss (comparable across
  runs and with other codebases), perplexity, the token count and every other metric."""
  totals = dict(totals)
  count = max(totals.pop("count", 0.0), 1.0)
  totals.pop("loss_sum", None)
  loss = totals.pop("nll", 0.0) / count
  result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
  for k, v in totals.items():
    result[k] = v[0] / max(v[1], 1.0) if isinstance(v, tuple) else v / count
  return result
