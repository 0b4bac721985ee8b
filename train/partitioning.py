"""Device mesh, logical-to-mesh rules, shardings of state and batch, and sharded init."""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from model import axes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXIS = axes.ACT_BATCH


class PartitionError(ValueError):
  """A layout that cannot work: raised before anything compiles."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh shape (sizes may be -1: fill with the remaining devices) and logical rules."""

  name: str
  mesh_shape: Mapping[str, int]
  rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]


def split_mesh_config(mesh_cfg: Mapping) -> tuple[str, dict, str]:
  """config.mesh -> (layout name, axis size overrides, grad_reduce)."""
  sizes = dict(mesh_cfg)
  sizes.pop("devices", None)  # how many devices, not an axis size
  return sizes.pop("layout"), sizes, sizes.pop("grad_reduce", "xla")


def load_layout(name: str, overrides: Mapping[str, int] | None = None) -> Layout:
  """Loads configs/sharding/<name>.py; `overrides` replaces axis sizes (0 keeps the file's)."""
  try:
    module = importlib.import_module(f"configs.sharding.{name}")
  except ModuleNotFoundError as e:
    raise PartitionError(f"unknown sharding layout {name!r}: no configs/sharding/{name}.py") from e
  shape = dict(module.MESH)
  for axis, size in (overrides or {}).items():
    if axis not in MESH_AXES:
      raise PartitionError(f"mesh axis {axis!r} is unknown; the mesh axes are {MESH_AXES}")
    if size:
      shape[axis] = int(size)
  return Layout(name, shape, tuple((k, v) for k, v in module.RULES))


def resolve_mesh_shape(shape: Mapping[str, int], n_devices: int) -> dict[str, int]:
  """Fills the one -1 axis so the product equals the device count, or says why it can't."""
  unknown = [a for a in shape if a not in MESH_AXES]
  if unknown:
    raise PartitionError(f"mesh axes {unknown} are unknown; the mesh axes are {MESH_AXES}")
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise PartitionError(f"only one mesh axis may be -1, got {fill}")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise PartitionError(f"mesh sizes must be positive or -1, got {sizes}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if n_devices % known:
      raise PartitionError(
        f"mesh {sizes}: {n_devices} devices are not divisible by the fixed axes' product {known}"
      )
    sizes[fill[0]] = n_devices // known
  if math.prod(sizes.values()) != n_devices:
    raise PartitionError(
      f"mesh {sizes} has {math.prod(sizes.values())} slots but there are "
      f"{n_devices} devices; make the product match or use -1 for one axis"
    )
  return sizes


def make_mesh(layout: Layout, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The layout's mesh over `devices` (default: all), its -1 axis filled."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(layout.mesh_shape, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def abstract_mesh(layout: Layout, n_devices: int) -> AbstractMesh:
  """The layout's mesh over `n_devices` that need not exist: for planning with eval_shape."""
  sizes = resolve_mesh_shape(layout.mesh_shape, n_devices)
  return AbstractMesh(
    tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
  )


def _mesh_axes_of(value) -> tuple[str, ...]:
  if value is None:
    return ()
  return (value,) if isinstance(value, str) else tuple(value)


def validate_rules(rules, mesh: Mesh) -> dict:
  """Every rule names a known logical axis, once, and existing mesh axes, each at most once."""
  seen = set()
  for logical, mesh_axes in rules.items() if isinstance(rules, Mapping) else rules:
    if logical not in axes.LOGICAL_AXES:
      raise PartitionError(
        f"sharding rule names unknown logical axis {logical!r}; known axes: "
        f"{', '.join(axes.LOGICAL_AXES)}"
      )
    if logical in seen:
      raise PartitionError(f"logical axis {logical!r} has two sharding rules; keep one")
    seen.add(logical)
    names = _mesh_axes_of(mesh_axes)
    for m in names:
      if m not in mesh.shape:
        raise PartitionError(
          f"rule {logical!r} -> {mesh_axes!r} names mesh axis {m!r}, which "
          f"is not in the mesh {dict(mesh.shape)}"
        )
    if len(set(names)) != len(names):
      raise PartitionError(f"rule {logical!r} -> {mesh_axes!r} names a mesh axis twice")
  return dict(rules)


def logical_specs(abstract_state) -> object:
  """The logical axis names of every parameter, as a tree of tuples."""
  return jax.tree.map(
    lambda v: tuple(v.get_metadata().get("out_sharding") or (None,) * v.ndim),
    abstract_state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def spec_for(
  path: str, logical: Sequence[str | None], shape: Sequence[int], rules: dict, mesh: Mesh
) -> PartitionSpec:
  """One parameter's PartitionSpec, checking for reuse of a mesh axis and divisibility."""
  spec, used = [], {}
  for dim, (name, size) in enumerate(zip(logical, shape)):
    mesh_axes = _mesh_axes_of(rules.get(name)) if name is not None else ()
    for m in mesh_axes:
      if m in used:
        raise PartitionError(
          f"parameter {path} {tuple(shape)} with axes {tuple(logical)}: dims "
          f"{used[m]} ({logical[used[m]]!r}) and {dim} ({name!r}) both map "
          f"to mesh axis {m!r} (size {mesh.shape[m]}); a mesh axis can "
          f"split only one dim of a tensor"
        )
      used[m] = dim
    n = math.prod(mesh.shape[m] for m in mesh_axes) if mesh_axes else 1
    if size % n:
      raise PartitionError(
        f"parameter {path} {tuple(shape)}: dim {dim} ({name!r}, size {size}) "
        f"is not divisible by mesh axes {mesh_axes} of size {n}"
      )
    spec.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
  return PartitionSpec(*spec)


def param_specs(abstract_state, mesh: Mesh, rules) -> object:
  """PartitionSpecs for a state of nnx.Variables, validated. Also checks that every mesh axis
  of size > 1 shards some parameter or the batch, so no rule silently does nothing."""
  rules = validate_rules(rules, mesh)
  used = set(_mesh_axes_of(rules.get(BATCH_AXIS)))

  def one(path, var):
    logical = var.get_metadata().get("out_sharding") or (None,) * var.ndim
    spec = spec_for(jax.tree_util.keystr(path), logical, var.shape, rules, mesh)
    for entry in spec:
      used.update(_mesh_axes_of(entry))
    return spec

  specs = jax.tree_util.tree_map_with_path(
    one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  idle = {a: n for a, n in mesh.shape.items() if n > 1 and a not in used}
  if idle:
    raise PartitionError(
      f"mesh axes {idle} (of mesh {dict(mesh.shape)}) shard no parameter and "
      f"not the batch under these rules; their devices would hold duplicate "
      f"work. Give them size 1 or add a rule that uses them"
    )
  return specs


def to_shardings(specs, mesh: Mesh):
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )


def opt_state_shardings(abstract_opt_state, params_shardings, mesh: Mesh):
  """Optimizer moments take the sharding of the parameter they mirror (matched by the
  parameter's key path at the end of theirs, and shape); counters are replicated."""
  by_path = {
    tuple(str(k) for k in path): s
    for path, s in jax.tree_util.tree_leaves_with_path(
      params_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    )
  }
  lengths = sorted({len(p) for p in by_path}, reverse=True)
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, leaf):
    keys = tuple(str(k) for k in path)
    for n in lengths:
      sharding = by_path.get(keys[-n:]) if len(keys) >= n else None
      if sharding is not None and len(sharding.spec) <= len(getattr(leaf, "shape", ())):
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def batch_spec(rules, ndim: int = 2) -> PartitionSpec:
  """Batch arrays split their leading dim by the activation_batch rule."""
  batch = dict(rules).get(BATCH_AXIS)
  return PartitionSpec(batch, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(rules, ndim))


def batch_divisor(mesh: Mesh, rules) -> int:
  """How many ways the global batch is split across devices."""
  return math.prod(mesh.shape[m] for m in batch_mesh_axes(rules))


GRAD_REDUCES = ("xla", "flat")


def batch_mesh_axes(rules) -> tuple[str, ...]:
  """The mesh axes the batch's leading dim is split over."""
  return _mesh_axes_of(dict(rules).get(BATCH_AXIS))


def check_grad_reduce(grad_reduce: str, mesh: Mesh, rules, param_shardings) -> None:
  """mesh.grad_reduce='flat' needs pure data parallelism: replicated parameters, and no mesh
  axis of size > 1 other than the batch's."""
  if grad_reduce not in GRAD_REDUCES:
    raise PartitionError(
      f"mesh.grad_reduce={grad_reduce!r} is unknown; choose one of {', '.join(GRAD_REDUCES)}"
    )
  if grad_reduce == "xla":
    return
  batch = batch_mesh_axes(rules)
  other = {a: n for a, n in mesh.shape.items() if n > 1 and a not in batch}
  if other:
    raise PartitionError(
      f"mesh.grad_reduce='flat' is data parallelism only, but mesh axes "
      f"{other} of mesh {dict(mesh.shape)} do not split the batch: use "
      f"mesh.grad_reduce='xla' with this layout"
    )
  for path, sharding in jax.tree_util.tree_leaves_with_path(
    param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
  ):
    if not sharding.is_fully_replicated:
      raise PartitionError(
        f"mesh.grad_reduce='flat' needs replicated parameters, but "
        f"{jax.tree_util.keystr(path)} is split as {sharding.spec}: use "
        f"mesh.grad_reduce='xla' with this layout"
      )


def check_batch_size(batch_size: int, mesh: Mesh, rules, grad_accum: int = 1) -> None:
  """The global batch splits evenly over the batch's mesh axes in every microbatch."""
  split = batch_divisor(mesh, rules)
  if batch_size % (split * grad_accum):
    raise PartitionError(
      f"batch of {batch_size} rows does not split into {grad_accum} "
      f"microbatch(es) over the batch's mesh axes "
      f"{_mesh_axes_of(dict(rules).get(BATCH_AXIS))} of size {split}: it "
      f"must be a multiple of {split * grad_accum}"
    )


def abstract_init(
  make_model: Callable[[], nnx.Module], mesh: Mesh, rules, grad_reduce: str = "xla"
):
  """(graphdef, abstract params state, params shardings) without computing anything; the
  layout, and `grad_reduce` with it, is checked."""
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
  shardings = to_shardings(param_specs(abstract_state, mesh, rules), mesh)
  check_grad_reduce(grad_reduce, mesh, rules, shardings)
  return graphdef, abstract_state, shardings


def sharded_init(make_model: Callable[[], nnx.Module], mesh: Mesh, rules, grad_reduce: str = "xla"):
  """Builds a model directly into its shardings: eval_shape, then a jit whose out_shardings
  place every parameter, so a model larger than one device is never built on one device.
  The layout, and `grad_reduce` with it, is checked before anything compiles.

  Returns (graphdef, params state, params shardings)."""
  graphdef, _, shardings = abstract_init(make_model, mesh, rules, grad_reduce)
  init = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings)
  with axes.axis_rules(mesh, rules):
    state = init()
  return graphdef, state, shardings


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict:
  """Host arrays of this process's rows -> global jax Arrays sharded along the batch."""
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    sharding = batch_sharding(mesh, rules, value.ndim)
    if jax.process_count() == 1:
      out[key] = jax.device_put(value, sharding)
    else:
      out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
