"""Layouts that cannot work fail before compiling, naming the parameter, axes and sizes."""

import re

import jax
import pytest
from flax import nnx

from model.config import preset
from model.transformer import Transformer
from train import partitioning
from train.partitioning import PartitionError

# 4 query heads, 2 kv heads, d_model 64, d_ff 128: kv heads do not split 8 ways.
CFG = preset("tiny")


def abstract_state(cfg=CFG):
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[1]


def specs(name, sizes=None, rules=None):
  """param_specs of the tiny model under a layout file, as `--config.mesh.*` would give it."""
  layout = partitioning.load_layout(name, sizes)
  mesh = partitioning.make_mesh(layout)
  return partitioning.param_specs(abstract_state(), mesh, layout.rules if rules is None else rules)


def raises(fragments, fn, *args, **kwargs):
  with pytest.raises(PartitionError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, f"{fragment!r} missing from the error: {message}"
  return message


def test_unknown_logical_axis_is_named_with_the_known_ones():
  rules = (("activation_batch", "fsdp"), ("embedding", "fsdp"))
  message = raises(["'embedding'", "embed, vocab, heads"], specs, "fsdp", rules=rules)
  assert "unknown logical axis" in message


def test_rule_naming_a_mesh_axis_not_in_the_mesh():
  rules = (("activation_batch", "fsdp"), ("embed", "model"))
  raises(["'embed'", "'model'", "'fsdp': 8"], specs, "fsdp", rules=rules)


def test_logical_axis_with_two_rules():
  rules = (("activation_batch", "fsdp"), ("embed", "fsdp"), ("embed", None))
  raises(["'embed'", "two sharding rules"], specs, "fsdp", rules=rules)


def test_rule_naming_a_mesh_axis_twice():
  rules = (("activation_batch", ("fsdp", "fsdp")),)
  raises(["'activation_batch'", "('fsdp', 'fsdp')", "twice"], specs, "fsdp", rules=rules)


def test_two_dims_of_one_tensor_on_the_same_mesh_axis():
  rules = (("activation_batch", "fsdp"), ("embed", "fsdp"), ("mlp", "fsdp"))
  # The first such tensor in tree order is block 0's MLP down projection [mlp, embed].
  raises(
    [
      "parameter ['blocks'][0]['mlp']['down']['kernel'] (128, 64)",
      "('mlp', 'embed')",
      "dims 0 ('mlp') and 1 ('embed')",
      "mesh axis 'fsdp' (size 8)",
    ],
    specs,
    "fsdp",
    rules=rules,
  )


def test_dim_not_divisible_by_its_mesh_axes():
  # Tensor parallel over 8 devices: 2 kv heads cannot split 8 ways.
  raises(
    [
      "parameter ['blocks'][0]['attn']['k']['kernel'] (64, 2, 16)",
      "dim 1 ('kv_heads', size 2)",
      "mesh axes ('tensor',) of size 8",
    ],
    specs,
    "tp",
  )


def test_dim_not_divisible_by_a_product_of_mesh_axes():
  # 256 devices that need not exist: the planner validates layouts on an AbstractMesh.
  layout = partitioning.load_layout("dp_fsdp_tp", {"data": 16, "fsdp": 1, "tensor": 16})
  mesh = partitioning.abstract_mesh(layout, 256)
  rules = (("activation_batch", "data"), ("mlp", ("data", "tensor")))
  raises(
    [
      "parameter ['blocks'][0]['mlp']['down']['kernel'] (128, 64)",
      "dim 0 ('mlp', size 128)",
      "mesh axes ('data', 'tensor') of size 256",
    ],
    partitioning.param_specs,
    abstract_state(),
    mesh,
    rules,
  )


def test_mesh_axis_that_shards_nothing():
  # `--config.mesh.layout=fsdp --config.mesh.data=2`: fsdp rules never use `data`.
  raises(
    ["{'data': 2}", "'fsdp': 4", "shard no parameter and not the batch"], specs, "fsdp", {"data": 2}
  )


def test_tensor_axis_idle_under_data_parallel_rules():
  raises(["{'tensor': 2}"], specs, "dp", {"tensor": 2})


def test_mesh_product_does_not_match_device_count():
  layout = partitioning.load_layout("dp_fsdp_tp", {"data": 3})
  raises(
    ["'data': 3, 'fsdp': 2, 'tensor': 2", "12 slots", "8 devices"], partitioning.make_mesh, layout
  )


def test_fill_axis_cannot_absorb_the_device_count():
  layout = partitioning.load_layout("fsdp_tp", {"tensor": 3})
  raises(["8 devices", "product 3"], partitioning.make_mesh, layout)


def test_unknown_layout_and_mesh_axis():
  raises(["'zero3'", "configs/sharding/zero3.py"], partitioning.load_layout, "zero3")
  raises(["'pipeline'"], partitioning.load_layout, "fsdp", {"pipeline": 2})


def test_batch_that_does_not_split_over_its_mesh_axes():
  layout = partitioning.load_layout("fsdp")
  mesh = partitioning.make_mesh(layout)
  raises(
    ["batch of 12 rows", "('fsdp',) of size 8", "multiple of 8"],
    partitioning.check_batch_size,
    12,
    mesh,
    layout.rules,
  )
  raises(
    ["2 microbatch", "multiple of 16"],
    partitioning.check_batch_size,
    8,
    mesh,
    layout.rules,
    grad_accum=2,
  )
  partitioning.check_batch_size(16, mesh, layout.rules, grad_accum=2)


def test_sharded_init_fails_before_compiling():
  """The error comes from validation, before any jit: no executable is built for a bad layout."""
  layout = partitioning.load_layout("tp")
  mesh = partitioning.make_mesh(layout)
  compiled = []
  jit = jax.jit

  def spy(*args, **kwargs):
    compiled.append(args)
    return jit(*args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jax, "jit", spy)
    raises(
      ["'kv_heads', size 2"],
      partitioning.sharded_init,
      lambda: Transformer(CFG, rngs=nnx.Rngs(0)),
      mesh,
      layout.rules,
    )
  assert not compiled


def test_error_names_match_the_model_paths():
  """The parameter names in errors are the keys of the params dict users see."""
  message = raises([], specs, "tp")
  path = re.search(r"parameter (\S+)", message).group(1)
  params = nnx.to_pure_dict(abstract_state())
  node = params
  for key in re.findall(r"\[('?)([^\]']+)\1\]", path):
    node = node[int(key[1]) if key[0] == "" else key[1]]
  assert node.shape == (64, 2, 16)


def test_flat_grad_reduce_needs_pure_data_parallelism():
  """mesh.grad_reduce='flat' on a layout that shards parameters or activations is refused,
  naming the setting, the axes or parameter and what to use instead."""
  state = abstract_state()
  for name, sizes, fragments in (
    ("fsdp", None, ["mesh.grad_reduce='flat'", "is split as", "mesh.grad_reduce='xla'"]),
    ("dp_fsdp_tp", None, ["mesh.grad_reduce='flat'", "'tensor': 2", "do not split the batch"]),
  ):
    layout = partitioning.load_layout(name, sizes)
    mesh = partitioning.make_mesh(layout)
    shardings = partitioning.to_shardings(partitioning.param_specs(state, mesh, layout.rules), mesh)
    raises(fragments, partitioning.check_grad_reduce, "flat", mesh, layout.rules, shardings)
    partitioning.check_grad_reduce("xla", mesh, layout.rules, shardings)  # no error
  raises(
    ["mesh.grad_reduce='ring'", "xla, flat"],
    partitioning.check_grad_reduce,
    "ring",
    mesh,
    layout.rules,
    shardings,
  )
