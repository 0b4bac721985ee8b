"""The host loop every stage runs through: compile, step, log, evaluate, sample, checkpoint."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
import tqdm

from data.tokenizer import tokenizer_to_json
from model import lora
from train import checkpoint as ckpt
from train import distributed, metrics, weights
from train import step as steplib
from train.sources import pinned
from train.stage import Stage, build_stage


def compile_step(step_fn, state, batch) -> tuple[Any, dict]:
  """Compiles a train step ahead of time and reports its memory needs."""
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  info = {"compile_seconds": seconds}
  if mem is not None:
    for name in (
      "argument_size_in_bytes",
      "output_size_in_bytes",
      "temp_size_in_bytes",
      "generated_code_size_in_bytes",
    ):
      info[name] = getattr(mem, name, 0)
  return compiled, info


def _combine(step_metrics: list[tuple[str, dict]], host: dict, several: bool) -> dict:
  """One iteration's logged figures: each state's step metrics averaged over its steps
  (prefixed by the state's name when the stage trains several), plus the host's."""
  by_state: dict[str, list[dict]] = {}
  for name, m in step_metrics:
    by_state.setdefault(name, []).append(m)
  out = {}
  for name, ms in by_state.items():
    prefix = f"{name}/" if several else ""
    for k in ms[0]:
      out[prefix + k] = float(np.mean([float(m[k]) for m in ms]))
  out.update({k: float(v) for k, v in host.items() if v is not None})
  return out


def _peak_flops(tc) -> float:
  """MFU's denominator: train.peak_flops is one device's peak; measured, one host's CPU."""
  if tc.peak_flops:
    return tc.peak_flops * jax.device_count()
  if jax.default_backend() == "cpu":
    return metrics.measure_peak_flops() * jax.process_count()
  return 0.0


def checkpoint_items(stage: Stage, config, tokenizer_json, sources: dict) -> dict:
  """The JSON a checkpoint carries besides the states; `sources`: setting -> the weights it
  named, as read (sources.pinned)."""
  models = stage.models()
  bases = {n: sources.get(stage.weights_from.get(n, "train.init_from")) for n in models}
  return {
    "config": config.to_dict(),
    "tokenizer": tokenizer_json,
    "host": stage.host_state(),
    "models": weights.models_item(models, bases),
    "sources": sources,
    **stage.checkpoint_items(),
  }


class NonFiniteError(FloatingPointError):
  """A step whose loss or gradient is NaN or Inf, under train.nonfinite=stop."""


def _check_resume_config(saved: dict, config, workdir: str) -> None:
  changes = ckpt.config_changes(saved, config.to_dict())
  if changes and not config.train.get("allow_config_change", False):
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
    raise ckpt.ConfigMismatch(
      f"{workdir} holds checkpoints of a run with another config (field: saved -> now): "
      f"{shown}. Choose another --workdir, or resume with these changes by setting "
      "--config.train.allow_config_change=True."
    )


def train(config, workdir: str) -> dict:
  """Trains the stage `config.stage` names (resuming from the latest checkpoint in workdir)
  and returns a summary."""
  os.makedirs(workdir, exist_ok=True)
  checkpointer = ckpt.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    config.train.get("keep_checkpoints", 3),
    config.train.get("async_checkpoints", True),
  )
  # Before anything is built: a workdir of another run is refused by name, and a resumed run
  # reads the weights its first start read (not a later step of the run they came from).
  before = checkpointer.latest_items(["config", "sources"])
  if "config" in before:
    _check_resume_config(before["config"], config, workdir)
  with pinned(before.get("sources")) as sources:
    stage = build_stage(config, workdir)
  tc = stage.train_cfg
  primary = jax.process_index() == 0
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  start = 0
  # A LoRA model's checkpoint holds its adapters (and heads) alone.
  lora_states = {n: lora.trains for n, (_, m) in stage.models().items() if m.lora_rank}
  saved = lambda states: steplib.saved_part(states, lora_states)
  abstract = ckpt.abstract_like(saved(stage.states), saved(stage.state_shardings))
  resumed = checkpointer.restore_latest(abstract)
  if resumed is not None:
    start, states, items = resumed
    stage.states = steplib.restored(stage.states, states, lora_states)
    stage.load_host_state(items.get("host", {}))
    print(f"resumed from step {start} in {checkpointer.directory}")

  writer = metrics.MetricsWriter(workdir, tc.tensorboard)
  peak = _peak_flops(tc) if stage.flops_per_token else 0.0
  summary: dict[str, Any] = {"params": stage.n_params, "start_step": start, "workdir": workdir}
  if start == 0:
    before = stage.samples(seed=0)
    if before:
      summary["sample_before"] = next(iter(before.values()))

  tokenizer_json = tokenizer_to_json(stage.tokenizer) if stage.tokenizer is not None else None
  bar = tqdm.tqdm(
    total=tc.steps,
    initial=start,
    disable=not (tc.progress and primary),
    unit="step",
    dynamic_ncols=True,
  )
  clock = metrics.StepClock(start)
  compiled: dict[str, Any] = {}

  def run_step(name, batch):
    """The stage's step for state `name`, compiled ahead of time on first use."""
    if name not in compiled:
      compiled[name], info = compile_step(stage.steps[name], stage.states[name], batch)
      summary.update({k if len(stage.steps) == 1 else f"{name}/{k}": v for k, v in info.items()})
      if primary:
        shown = ", ".join(
          f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()
        )
        print(f"compiled {name} step: {shown}")
      clock.resumed()  # compiling is not stepping
    stage.states[name], m = compiled[name](stage.states[name], batch)
    return m

  def log(step, step_metrics, host):
    """Waits for `step`'s metrics, then logs them with the rate since the last log."""
    m = _combine(jax.device_get(step_metrics), host, len(stage.states) > 1)
    clock.reached(step)
    m.update(
      metrics.throughput(
        *clock.take_window(), stage.tokens_per_iteration, stage.flops_per_token, peak
      )
    )
    writer.write(step, m)
    postfix = {"loss": f"{m['loss']:.3f}"} if "loss" in m else {}
    if m["tokens_per_s"] is not None:
      postfix["tok_s"] = f"{m['tokens_per_s']:.0f}"
      postfix["mfu"] = f"{m['mfu']:.1%}" if m["mfu"] is not None else "n/a"
    if postfix:
      bar.set_postfix(**postfix)
    return m

  def show_samples(step, seed):
    for tag, text in stage.samples(seed=seed).items():
      writer.text(step, tag, text)
      if stage.echo_samples:
        bar.write(f"step {step} {tag}:\n{text}")

  checked = [start]  # the last step check_finite has seen

  def check_finite(at, step_metrics):
    """A step of iteration `at` with a NaN or Inf loss or gradient left its state unchanged
    (train/step.py); under train.nonfinite=stop the run stops here, naming it."""
    if at <= checked[0]:
      return
    checked[0] = at
    flags = jax.device_get([m["nonfinite"] for _, m in step_metrics])
    bad = [(name, m) for (name, m), flag in zip(step_metrics, flags) if flag]
    if not bad:
      return
    name, m = bad[0]
    what = (
      f"{name if len(stage.states) > 1 else 'the'} loss {float(m['loss']):.4g}, gradient norm "
      f"{float(m['grad_norm']):.4g}"
    )
    if tc.nonfinite == "skip":
      bar.write(f"step {at}: {what}; skipped the update (train.nonfinite=skip)")
      return
    checkpointer.close()
    writer.close()
    latest = checkpointer.latest_step()
    raise NonFiniteError(
      f"step {at}: {what}. The run stopped without applying or saving that step; "
      + (
        f"its last checkpoint, step {latest} in {checkpointer.directory}, is good"
        if latest
        else "it has no checkpoint yet"
      )
      + ". Look at that step's data or lower the learning rate, then run again to resume; "
      "--config.train.nonfinite=skip skips such steps instead."
    )

  last, pending = {}, None
  t_start = time.perf_counter()
  stop = ckpt.StopSignal()
  step = start
  signalled = False
  with stop:
    while step < tc.steps:
      step_metrics = [(name, run_step(name, batch)) for name, batch in stage.updates()]
      host = stage.iteration_metrics()
      step += 1
      if pending is not None:  # read the previous iteration's metrics while this one runs
        pending_step, *pending_m = pending
        check_finite(pending_step, pending_m[0])
        if pending_step % tc.log_every == 0 or pending_step == start + 1:
          last = log(pending_step, *pending_m)
      pending = (step, step_metrics, host)
      bar.update(1)
      timed_out = tc.max_seconds and time.perf_counter() - t_start > tc.max_seconds
      # Processes see signals and clocks apart; all must stop at the same step.
      signalled, timed_out = distributed.any_process(
        (stop.received is not None, timed_out), step, tc.log_every
      )
      done = step >= tc.steps or timed_out or signalled
      evaluating = tc.eval_every and step % tc.eval_every == 0 and not done
      saving = (tc.checkpoint_every and step % tc.checkpoint_every == 0) or done
      if done:  # the last step is always logged
        last = log(step, step_metrics, host)
      elif evaluating or saving:  # count this step's time, then leave the pause out
        jax.block_until_ready([m for _, m in step_metrics])
        clock.reached(step)
      if evaluating:
        ev = stage.evaluate()
        writer.write(step, ev, prefix="val")
        show_samples(step, seed=step)
        if "loss" in ev:
          bar.write(f"step {step}: val loss {ev['loss']:.4f}")
        else:
          bar.write(f"step {step}: " + ", ".join(f"val {k} {v:.4g}" for k, v in ev.items()))
      if saving:
        check_finite(step, step_metrics)  # never a checkpoint after a bad step under "stop"
        # The host state now is exactly `step` iterations in: what a resume needs.
        checkpointer.save(
          step, saved(stage.states), checkpoint_items(stage, config, tokenizer_json, sources)
        )
      if done:
        break
      if evaluating or saving:
        clock.resumed()
  bar.close()
  checkpointer.close()
  # The run's rate: every step this process ran over the time spent stepping.
  rate = metrics.throughput(
    clock.total_steps, clock.total_s, stage.tokens_per_iteration, stage.flops_per_token, peak
  )
  summary.update(
    final_step=step,
    train_loss=last.get("loss"),
    **rate,
    stopped_by_signal=stop.received,
    train_seconds=time.perf_counter() - t_start,
  )
  if signalled:
    print(
      f"received signal {stop.received or 'in another process'}: saved a checkpoint at step "
      f"{step}; run again to resume"
    )
    writer.close()
    stage.close()
    return summary
  ev = stage.evaluate()
  writer.write(step, ev, prefix="val")
  summary["val"] = ev
  if "loss" in ev:
    summary["val_loss"] = ev["loss"]
  after = stage.samples(seed=step)
  for tag, text in after.items():
    writer.text(step, tag, text)
    if stage.echo_samples and primary:
      print(f"step {step} {tag}:\n{text}")
  if after:
    summary["sample_after"] = next(iter(after.values()))
  writer.close()
  stage.close()
  if primary:
    summary["loss_plot"] = metrics.plot_losses(writer.path, os.path.join(workdir, "loss.png"))
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(
        {k: v for k, v in summary.items() if not isinstance(v, str) or len(v) < 4000},
        f,
        indent=1,
        default=str,
      )
    if "loss" in ev:
      print(f"val loss {ev['loss']:.4f} (perplexity {ev['perplexity']:.2f}) at step {step}")
    else:
      print(f"at step {step}: " + ", ".join(f"val {k} {v:.4g}" for k, v in ev.items()))
  return summary
