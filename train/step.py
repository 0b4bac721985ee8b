"""The one train step every stage shares, and the eval step, jit-compiled on a mesh."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec

from model import axes, layers, lora
from train import optim, partitioning

# loss_fn(model, batch, rng or None) -> (loss_sum, count, metric sums). A metric sum is a
# scalar, reported per unit of the loss's count, or a (sum, count) pair with its own
# denominator (per sequence, per pair, ...). Sums, so accumulation and devices stay exact.
LossFn = Callable


def finalize_metrics(metric_sums: dict, denom) -> dict:
  """Metric sums over their denominators: `denom` (the loss's count) for plain sums, their
  own count for (sum, count) pairs."""
  out = {}
  for k, v in metric_sums.items():
    if isinstance(v, tuple):
      total, count = v
      out[k] = total / jnp.maximum(count, 1.0)
    else:
      out[k] = v / denom
  return out


@struct.dataclass
class TrainState:
  """Everything a step changes. `rng` is a raw uint32 key; each step's dropout key is derived
  from it and the step number, so resuming reproduces the same randomness."""

  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


def trained_part(params, trainable=None) -> tuple[dict, dict]:
  """(the parameters a step trains, the frozen rest): all and none without `trainable`, a
  predicate on a parameter's path (model/lora.py's `trains` for LoRA)."""
  return (params, {}) if trainable is None else lora.split(params, trainable)


def saved_part(states: dict, trainable: dict) -> dict:
  """What a checkpoint holds of each named TrainState (or of its shardings): all of it, or for
  a state in `trainable` (name -> predicate) its trained parameters alone: LoRA adapters and
  heads, whose base weights come again from the run's train.init_from."""
  return {
    name: s.replace(params=trained_part(s.params, trainable[name])[0]) if name in trainable else s
    for name, s in states.items()
  }


def restored(states: dict, saved: dict, trainable: dict) -> dict:
  """`states` with what a checkpoint held (`saved_part` of them) put back."""
  return {
    name: saved[name].replace(
      params=lora.join(saved[name].params, trained_part(s.params, trainable[name])[1])
    )
    if name in trainable
    else saved[name]
    for name, s in states.items()
  }


def init_state(params, optimizer: optax.GradientTransformation, seed: int, trainable=None):
  """A TrainState at step 0; optimizer state only for the trained parameters."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(trained_part(params, trainable)[0]),
    rng=jax.random.PRNGKey(seed),
  )


def init_sharded(
  make_model: Callable[[], nnx.Module],
  opt_cfg: optim.OptimConfig,
  mesh,
  rules,
  seed: int,
  grad_reduce: str = "xla",
  load_params: Callable[[dict], dict] | None = None,
  trainable=None,
):
  """A TrainState built directly into its shardings on `mesh` (which `grad_reduce`, the
  train step's, must suit). With `trainable` (see `trained_part`) the optimizer sees only
  those parameters.

  `load_params(param shardings) -> params`, when given, supplies the parameters (weights from
  elsewhere, already placed on those shardings) instead of the model's random init.
  Returns (graphdef, state, state shardings, optimizer); params are a pure dict."""
  if load_params is None:
    graphdef, params_state, param_shardings = partitioning.sharded_init(
      make_model, mesh, rules, grad_reduce
    )
    params = nnx.to_pure_dict(params_state)
    param_shardings = nnx.to_pure_dict(param_shardings)
  else:
    graphdef, _, param_shardings = partitioning.abstract_init(make_model, mesh, rules, grad_reduce)
    param_shardings = nnx.to_pure_dict(param_shardings)
    params = load_params(param_shardings)
  optimizer = optim.make_optimizer(opt_cfg, trained_part(params, trainable)[0])
  shardings = state_shardings(optimizer, params, param_shardings, mesh, trainable)
  init = lambda p: init_state(p, optimizer, seed, trainable)
  state = jax.jit(init, out_shardings=shardings)(params)
  return graphdef, state, shardings, optimizer


def state_shardings(optimizer, params, param_shardings, mesh, trainable=None) -> TrainState:
  """Where each part of a TrainState lives: moments like their parameters, counters
  replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract_opt = jax.eval_shape(optimizer.init, trained_part(params, trainable)[0])
  trained_shardings = trained_part(param_shardings, trainable)[0]
  return TrainState(
    step=replicated,
    params=param_shardings,
    opt_state=partitioning.opt_state_shardings(abstract_opt, trained_shardings, mesh),
    rng=replicated,
  )


def _split_microbatches(batch, k: int):
  """[B, ...] -> [k, B/k, ...] taking every k-th row, so each microbatch draws rows from every
  device's shard of the batch (no resharding) and all k together are the whole batch."""

  def one(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} microbatches")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  return jax.tree.map(one, batch)


def compute_grads(graphdef, loss_fn, params, batch, rng, grad_accum: int, frozen=None):
  """Summed loss, count, metric sums and the gradient of the summed loss with respect to
  `params`; `frozen` parameters complete the model without a gradient."""

  def objective(p, mb, r):
    full = p if not frozen else lora.join(p, frozen)
    loss_sum, count, metrics = loss_fn(nnx.merge(graphdef, full), mb, r)
    return loss_sum, (count, metrics)

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if grad_accum == 1:
    (loss_sum, (count, metrics)), grads = grad_fn(params, batch, rng)
    return loss_sum, count, metrics, grads

  def body(acc, xs):
    mb, i = xs
    (loss_sum, (count, metrics)), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, acc, (loss_sum, count, metrics, grads)), None

  mbs = _split_microbatches(batch, grad_accum)
  first = jax.tree.map(lambda x: x[0], mbs)
  shapes = jax.eval_shape(
    lambda p, mb: (lambda o: (o[0][0], o[0][1][0], o[0][1][1], o[1]))(grad_fn(p, mb, rng)),
    params,
    first,
  )
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  (loss_sum, count, metrics, grads), _ = jax.lax.scan(body, zeros, (mbs, jnp.arange(grad_accum)))
  return loss_sum, count, metrics, grads


def flat_data_parallel_grads(
  graphdef, loss_fn, params, batch, rng, grad_accum: int, mesh, rules, frozen=None
):
  """compute_grads with manual data parallelism: each device takes its shard of the batch, and
  one all-reduce sums every device's loss, count, metric sums and gradients as a single flat
  vector.

  Under jit's automatic partitioning the reductions are placed after each weight-gradient
  matmul, one per parameter, and XLA:CPU runs such a combined all-reduce one operand at a time
  (a device rendezvous each). The result is the same sums (up to float summation order), and
  dropout is the same too: each device applies its rows of the whole batch's masks
  (`layers.batch_shard`). Needs replicated parameters (`partitioning.check_grad_reduce`).

  check_vma=False keeps the per-device gradients local: with it on, JAX would psum the
  gradient of each replicated parameter by itself, which is what this avoids.
  """
  batch_axes = partitioning.batch_mesh_axes(rules)
  n_shards = partitioning.batch_divisor(mesh, rules)

  def local(params, frozen, batch, rng):
    with axes.manual(), layers.batch_shard(jax.lax.axis_index(batch_axes), n_shards):
      out = compute_grads(graphdef, loss_fn, params, batch, rng, grad_accum, frozen)
    flat, unravel = ravel_pytree(out)
    return unravel(jax.lax.psum(flat, batch_axes))

  replicated, split = PartitionSpec(), PartitionSpec(batch_axes)
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(replicated, replicated, split, replicated),
    out_specs=replicated,
    check_vma=False,
  )(params, frozen or {}, batch, rng)


def train_step(
  state: TrainState,
  batch,
  *,
  graphdef,
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  lr_schedule,
  grad_accum: int = 1,
  mesh=None,
  rules=(),
  grad_reduce: str = "xla",
  count_name: str = "tokens",
  trainable=None,
):
  """One optimizer update from one global batch (split into grad_accum microbatches).
  With `trainable` (see `trained_part`), only those parameters get gradients and updates;
  the rest pass through bitwise unchanged.

  The loss is loss_sum / count; `count_name` names what the count counts in the metrics
  (tokens, sequences, pairs).

  grad_reduce 'xla' leaves the gradient reductions to jit's partitioner; 'flat' computes them
  with `flat_data_parallel_grads` (pure data parallelism on `mesh`)."""
  with axes.axis_rules(mesh, rules) if mesh is not None else contextlib.nullcontext():
    rng = jax.random.fold_in(state.rng, state.step)
    trained, frozen = trained_part(state.params, trainable)
    if grad_reduce == "flat" and mesh is not None and mesh.size > 1:
      loss_sum, count, metric_sums, grads = flat_data_parallel_grads(
        graphdef, loss_fn, trained, batch, rng, grad_accum, mesh, rules, frozen
      )
    else:
      loss_sum, count, metric_sums, grads = compute_grads(
        graphdef, loss_fn, trained, batch, rng, grad_accum, frozen
      )
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, trained)
    params = optax.apply_updates(trained, updates)
    grad_norm = optax.tree.norm(grads)
    # A NaN or Inf in the loss or the gradients leaves the parameters and the optimizer as
    # they were (the loop then stops or skips, by train.nonfinite): a bad batch never reaches
    # a checkpoint. The select fuses into the update; finite steps are bitwise unchanged.
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    params, opt_state = keep(params, trained), keep(opt_state, state.opt_state)
    params = lora.join(params, frozen) if frozen else params
  metrics = {
    "loss": loss_sum / denom,
    "grad_norm": grad_norm,
    "lr": lr_schedule(state.step),
    count_name: count,
    "nonfinite": 1.0 - finite.astype(jnp.float32),
  }
  metrics.update(finalize_metrics(metric_sums, denom))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, graphdef, loss_fn: LossFn, mesh=None, rules=()):
  """Summed loss, count and metric sums of one batch, without dropout."""
  with axes.axis_rules(mesh, rules) if mesh is not None else contextlib.nullcontext():
    loss_sum, count, metric_sums = loss_fn(nnx.merge(graphdef, params), batch, None)
  return {"loss_sum": loss_sum, "count": count, **metric_sums}


def jit_train_step(state_shardings, batch_shardings, **kwargs):
  """The train step jitted with explicit shardings and the state donated."""
  return jax.jit(
    functools.partial(train_step, **kwargs),
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, None),
    donate_argnums=0,
  )


def jit_eval_step(params_shardings, batch_shardings, **kwargs):
  return jax.jit(
    functools.partial(eval_step, **kwargs), in_shardings=(params_shardings, batch_shardings)
  )
