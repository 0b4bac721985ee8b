"""The host loop: build the run, then step, log, evaluate, sample and checkpoint."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from data import corpus
from data.pipeline import eval_batches, pretrain_iterator
from data.tokenizer import tokenizer_to_json
from model.config import ModelConfig
from model.sampling import Sampler, SamplingConfig, left_pad
from model.transformer import Transformer
from train import checkpoint as ckpt
from train import distributed, losses, metrics, optim, partitioning
from train import step as steplib


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop settings; configs/base.py documents each field."""

  steps: int = 1000
  seed: int = 0
  log_every: int = 10
  eval_every: int = 250
  eval_batches: int = 0
  checkpoint_every: int = 250
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  max_seconds: float = 0.0
  z_loss: float = 0.0
  peak_flops: float = 0.0
  sample_prompt: str = ""
  sample_tokens: int = 200
  sample_temperature: float = 0.8
  sample_top_k: int = 0
  tensorboard: bool = True
  progress: bool = True


def section(cls, values: Mapping[str, Any], name: str):
  """A frozen dataclass from a config section, naming any field it does not know."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"config.{name} has unknown fields {unknown}; known: {sorted(known)}")
  return cls(**dict(values))


@dataclasses.dataclass
class Run:
  """Everything a run is built from; tests and benchmarks reuse the pieces."""

  config: Any
  workdir: str
  model_cfg: ModelConfig
  data_cfg: corpus.DataConfig
  opt_cfg: optim.OptimConfig
  train_cfg: TrainConfig
  tokenizer: Any
  train_dir: str
  val_dir: str
  mesh: Any
  rules: tuple
  graphdef: Any
  state: steplib.TrainState
  state_shardings: Any
  batch_shardings: dict
  train_step: Any
  eval_step: Any
  n_params: int
  sampler: Any = None


def build(config, workdir: str) -> Run:
  """Data, mesh, sharded state and jitted steps for `config` (an ml_collections ConfigDict)."""
  os.makedirs(workdir, exist_ok=True)
  train_cfg = section(TrainConfig, config.train, "train")
  data_cfg = section(corpus.DataConfig, config.data, "data")
  blocks = config.model.get("attention_query_blocks", 1)
  if isinstance(blocks, int) and blocks > 1 and data_cfg.seq_len % blocks:
    raise ValueError(f"model.attention_query_blocks={blocks} must divide "
                     f"data.seq_len={data_cfg.seq_len} (other lengths would run unblocked)")
  tokenizer, train_dir, val_dir = distributed.primary_first(  # one process writes the shared data
      lambda: corpus.build(data_cfg, workdir, progress=train_cfg.progress))
  model_fields = dict(config.model)
  if model_fields.get("vocab_size", 0) == 0:
    model_fields["vocab_size"] = tokenizer.vocab_size
  model_cfg = section(ModelConfig, model_fields, "model")
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                     f"{tokenizer.vocab_size}; set it to 0 to follow the tokenizer")
  if model_cfg.position == "learned" and data_cfg.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"data.seq_len={data_cfg.seq_len} exceeds model.max_seq_len="
                     f"{model_cfg.max_seq_len}")
  prompt_len = len(tokenizer.encode(train_cfg.sample_prompt, bos=data_cfg.add_bos)) or 1
  if model_cfg.position == "learned" and prompt_len >= model_cfg.max_seq_len:
    raise ValueError(f"train.sample_prompt is {prompt_len} tokens; with learned positions it "
                     f"must leave room to sample within model.max_seq_len="
                     f"{model_cfg.max_seq_len}")
  opt_fields = dict(config.opt)
  opt_fields["total_steps"] = opt_fields.get("total_steps") or train_cfg.steps
  opt_cfg = section(optim.OptimConfig, opt_fields, "opt")

  layout_name, sizes, grad_reduce = partitioning.split_mesh_config(config.mesh)
  layout = partitioning.load_layout(layout_name, sizes)
  mesh = partitioning.make_mesh(layout)
  rules = layout.rules
  partitioning.check_batch_size(data_cfg.batch_size, mesh, rules, opt_cfg.grad_accum)
  partitioning.check_batch_size(data_cfg.eval_batch_size, mesh, rules)
  for name in ("batch_size", "eval_batch_size"):
    if getattr(data_cfg, name) % jax.process_count():
      raise partitioning.PartitionError(f"data.{name}={getattr(data_cfg, name)} must be "
                                        f"divisible by the process count "
                                        f"({jax.process_count()})")

  graphdef, state, state_shardings, optimizer = steplib.init_sharded(
      lambda: Transformer(model_cfg, rngs=nnx.Rngs(train_cfg.seed)), opt_cfg, mesh, rules,
      train_cfg.seed, grad_reduce)
  param_shardings = state_shardings.params
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

  keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
  batch_shardings = {k: partitioning.batch_sharding(mesh, rules) for k in keys}
  loss_fn = lambda model, batch, rng: losses.lm_loss(model, batch, rng, z_loss=train_cfg.z_loss)
  train_step = steplib.jit_train_step(
      state_shardings, batch_shardings, graphdef=graphdef, loss_fn=loss_fn, optimizer=optimizer,
      lr_schedule=optim.schedule(opt_cfg), grad_accum=opt_cfg.grad_accum, mesh=mesh, rules=rules,
      grad_reduce=grad_reduce)
  eval_step = steplib.jit_eval_step(param_shardings, batch_shardings, graphdef=graphdef,
                                    loss_fn=loss_fn, mesh=mesh, rules=rules)
  return Run(config, workdir, model_cfg, data_cfg, opt_cfg, train_cfg, tokenizer, train_dir,
             val_dir, mesh, rules, graphdef, state, state_shardings, batch_shardings, train_step,
             eval_step, n_params)


def evaluate(run: Run, params, max_batches: int = 0) -> dict:
  """Loss and perplexity over the validation split (all of it when max_batches is 0)."""
  totals: dict[str, float] = {}
  block, blocks = distributed.batch_block(run.batch_shardings["inputs"],
                                          run.data_cfg.eval_batch_size)
  batches = eval_batches(run.val_dir, seq_len=run.data_cfg.seq_len,
                         batch_size=run.data_cfg.eval_batch_size // blocks,
                         process_index=block, process_count=blocks)
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    out = jax.device_get(run.eval_step(params, partitioning.shard_batch(batch, run.mesh,
                                                                        run.rules)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = max(totals.pop("count", 0.0), 1.0)
  totals.pop("loss_sum")
  loss = totals["nll"] / count  # without z-loss: comparable across runs and with other codebases
  result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
  result.update({k: v / count for k, v in totals.items()})
  return result


def sample_text(run: Run, params, seed: int = 0) -> str:
  """One continuation of train.sample_prompt, decoded."""
  tc, tok = run.train_cfg, run.tokenizer
  prompt = tok.encode(tc.sample_prompt, bos=run.data_cfg.add_bos) if tc.sample_prompt else []
  prompt = prompt or [tok.bos_id]
  budget = run.model_cfg.max_seq_len - len(prompt) if run.model_cfg.position == "learned" else 10**9
  cfg = SamplingConfig(max_new_tokens=max(1, min(tc.sample_tokens, budget)),
                       temperature=tc.sample_temperature, top_k=tc.sample_top_k,
                       eos_id=tok.eos_id if run.data_cfg.add_eos else None, pad_id=tok.pad_id)
  tokens, mask = left_pad([prompt], tok.pad_id)
  if run.sampler is None:
    run.sampler = Sampler(run.graphdef)
  out = run.sampler(params, tokens, mask, jax.random.PRNGKey(seed), cfg)
  generated = np.asarray(out.tokens_BxN[0])[np.asarray(out.mask_BxN[0]) > 0]
  return tc.sample_prompt + tok.decode([int(t) for t in generated])


def _compile(run: Run, batch) -> Any:
  """Compiles the train step ahead of time and reports its memory needs."""
  t0 = time.perf_counter()
  compiled = run.train_step.lower(run.state, batch).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  info = {"compile_seconds": seconds}
  if mem is not None:
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes"):
      info[name] = getattr(mem, name, 0)
  return compiled, info


def train(config, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in workdir) and returns a summary."""
  run = build(config, workdir)
  tc = run.train_cfg
  primary = jax.process_index() == 0
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  checkpointer = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), tc.keep_checkpoints,
                                   tc.async_checkpoints)
  # Each process reads the rows of every global batch that its devices hold.
  block, blocks = distributed.batch_block(run.batch_shardings["inputs"], run.data_cfg.batch_size)
  it = pretrain_iterator(run.train_dir, seq_len=run.data_cfg.seq_len,
                         batch_size=run.data_cfg.batch_size // blocks, seed=run.data_cfg.seed,
                         process_index=block, process_count=blocks,
                         worker_count=run.data_cfg.worker_count,
                         window_stride=run.data_cfg.window_stride)
  start = checkpointer.latest_step() or 0
  if start:
    abstract = ckpt.abstract_like(run.state, run.state_shardings)
    run.state, data_state = checkpointer.restore(start, abstract)
    if data_state is not None:
      it.set_state(ckpt.data_state_for_this_process(data_state, it.get_state()))
    print(f"resumed from step {start} in {checkpointer.directory}")

  writer = metrics.MetricsWriter(workdir, tc.tensorboard)
  tokens_per_step = run.data_cfg.batch_size * run.data_cfg.seq_len
  flops_token = metrics.flops_per_token(run.model_cfg, run.n_params, run.data_cfg.seq_len)
  # MFU's denominator: train.peak_flops is one device's peak; measured, one host's CPU.
  if tc.peak_flops:
    peak = tc.peak_flops * jax.device_count()
  elif jax.default_backend() == "cpu":
    peak = metrics.measure_peak_flops() * jax.process_count()
  else:
    peak = 0.0
  summary: dict[str, Any] = {"params": run.n_params, "start_step": start, "workdir": workdir}
  if start == 0:
    summary["sample_before"] = sample_text(run, run.state.params)

  batch = partitioning.shard_batch(next(it), run.mesh, run.rules)
  compiled, compile_info = _compile(run, batch)
  summary.update(compile_info)
  if primary:
    print("compiled train step: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else
                                             f"{k}={v}" for k, v in compile_info.items()))

  tokenizer_json = tokenizer_to_json(run.tokenizer)
  bar = tqdm.tqdm(total=tc.steps, initial=start, disable=not (tc.progress and primary),
                  unit="step", dynamic_ncols=True)
  clock = metrics.StepClock(start)

  def log(step, m):
    """Waits for `step`'s metrics, then logs them with the rate since the last log."""
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    clock.reached(step)
    m.update(metrics.throughput(*clock.take_window(), tokens_per_step, flops_token, peak))
    writer.write(step, m)
    if m["tokens_per_s"] is not None:
      bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}",
                      mfu=f"{m['mfu']:.1%}" if m["mfu"] is not None else "n/a")
    return m

  last, pending = {}, None
  t_start = time.perf_counter()
  stop = ckpt.StopSignal()
  step = start
  signalled = False
  with stop:
    while step < tc.steps:
      run.state, m = compiled(run.state, batch)
      step += 1
      if pending is not None:  # read the previous step's metrics while this one runs
        pending_step, pending_m = pending
        if pending_step % tc.log_every == 0 or pending_step == start + 1:
          last = log(pending_step, pending_m)
      pending = (step, m)
      bar.update(1)
      timed_out = tc.max_seconds and time.perf_counter() - t_start > tc.max_seconds
      # Processes see signals and clocks apart; all must stop at the same step.
      signalled, timed_out = distributed.any_process((stop.received is not None, timed_out),
                                                     step, tc.log_every)
      done = step >= tc.steps or timed_out or signalled
      data_state = it.get_state()  # exactly `step` batches consumed: what a resume needs
      if not done:
        batch = partitioning.shard_batch(next(it), run.mesh, run.rules)
      evaluating = tc.eval_every and step % tc.eval_every == 0 and not done
      saving = (tc.checkpoint_every and step % tc.checkpoint_every == 0) or done
      if done:  # the last step is always logged
        last = log(step, m)
      elif evaluating or saving:  # count this step's time, then leave the pause out
        jax.block_until_ready(m)
        clock.reached(step)
      if evaluating:
        ev = evaluate(run, run.state.params, tc.eval_batches)
        writer.write(step, ev, prefix="val")
        writer.text(step, "sample", sample_text(run, run.state.params, seed=step))
        bar.write(f"step {step}: val loss {ev['loss']:.4f}")
      if saving:
        checkpointer.save(step, run.state, data_state, config.to_dict(), tokenizer_json)
      if done:
        break
      if evaluating or saving:
        clock.resumed()
  bar.close()
  checkpointer.close()
  # The run's rate: every step this process ran over the time spent stepping.
  rate = metrics.throughput(clock.total_steps, clock.total_s, tokens_per_step, flops_token, peak)
  summary.update(final_step=step, train_loss=last.get("loss"), **rate,
                 stopped_by_signal=stop.received, train_seconds=time.perf_counter() - t_start)
  if signalled:
    print(f"received signal {stop.received or 'in another process'}: saved a checkpoint at step "
          f"{step}; run again to resume")
    writer.close()
    it.close()
    return summary
  ev = evaluate(run, run.state.params, tc.eval_batches)
  writer.write(step, ev, prefix="val")
  summary["val_loss"] = ev["loss"]
  summary["sample_after"] = sample_text(run, run.state.params, seed=step)
  writer.text(step, "sample", summary["sample_after"])
  writer.close()
  it.close()
  if primary:
    summary["loss_plot"] = metrics.plot_losses(writer.path, os.path.join(workdir, "loss.png"))
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({k: v for k, v in summary.items() if not isinstance(v, str) or len(v) < 4000},
                f, indent=1, default=str)
    print(f"val loss {ev['loss']:.4f} (perplexity {ev['perplexity']:.2f}) at step {step}")
  return summary
