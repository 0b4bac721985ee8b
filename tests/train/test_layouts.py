"""Every sharding layout trains exactly like one device, and places parameters as its rules say."""

import functools
import re

import jax
import numpy as np
import pytest
from flax import nnx

from model import axes, lora
from model.config import preset
from model.transformer import Transformer
from train import losses, optim, partitioning
from train import step as steplib

# Every split the layouts make divides this model: 8 query and 4 kv heads (GQA), d_model 64,
# d_ff 128 and vocab 256 over fsdp 8, tensor 4 and fsdp x tensor 4 x 2.
CFG = preset("tiny", n_heads=8, n_kv_heads=4, d_model=64, d_ff=128, vocab_size=256, max_seq_len=16)
BATCH, SEQ, STEPS = 16, 16, 5
# Adam divides each gradient element by its own running scale, so an element whose gradient is
# ~1e-9 (while its tensor's largest is ~1e-2) moves by about lr whatever its fp32 rounding:
# with eps=1e-8 a legitimate 1e-7-relative difference in reduction order becomes a 1e-4 change
# in such a parameter. eps 1e-3 keeps the update a smooth function of the gradient, so the
# parameters after 5 steps are compared tightly. The gradient norm is ~0.8: clipping at 0.5
# keeps the global-norm reduction (across every shard) on the path being tested.
EPS = 1e-3
CLIP = 0.5


def batches():
  """The same fixed random batches for every layout."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    toks = rng.integers(1, CFG.vocab_size, size=(BATCH, SEQ + 1)).astype(np.int32)
    out.append(
      {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "segment_ids": np.ones((BATCH, SEQ), np.int32),
        "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
        "loss_mask": np.ones((BATCH, SEQ), np.float32),
      }
    )
  return out


def build(layout, devices, grad_accum=1, cfg=CFG, grad_reduce="xla"):
  """Mesh, sharded TrainState and jitted step, wired as train/loop.py's `build` does."""
  mesh = partitioning.make_mesh(layout, devices)
  rules = layout.rules
  opt_cfg = optim.OptimConfig(
    lr=1e-2,
    warmup_steps=0,
    total_steps=100,
    schedule="constant",
    eps=EPS,
    clip_norm=CLIP,
    grad_accum=grad_accum,
  )
  trainable = lora.trains if cfg.lora_rank else None
  graphdef, state, state_shardings, optimizer = steplib.init_sharded(
    lambda: Transformer(cfg, rngs=nnx.Rngs(0)),
    opt_cfg,
    mesh,
    rules,
    seed=0,
    grad_reduce=grad_reduce,
    trainable=trainable,
  )
  batch_shardings = {k: partitioning.batch_sharding(mesh, rules) for k in batches()[0]}
  step = steplib.jit_train_step(
    state_shardings,
    batch_shardings,
    graphdef=graphdef,
    loss_fn=losses.lm_loss,
    optimizer=optimizer,
    lr_schedule=optim.schedule(opt_cfg),
    grad_accum=grad_accum,
    mesh=mesh,
    rules=rules,
    grad_reduce=grad_reduce,
    trainable=trainable,
  )
  return mesh, state, step


@functools.cache
def trained(case):
  """(layout, mesh, final state, per-step (loss, grad norm), step) of a CASES entry, built once."""
  c = CASES[case]
  layout = partitioning.load_layout(c["layout"], c.get("sizes", {}))
  cfg = CFG.replace(**c.get("model", {}))
  return (layout,) + train(
    layout, jax.devices()[: c["devices"]], c.get("grad_accum", 1), cfg, c.get("grad_reduce", "xla")
  )


def train(layout, devices, grad_accum=1, cfg=CFG, grad_reduce="xla"):
  mesh, state, step = build(layout, devices, grad_accum, cfg, grad_reduce)
  loss_history = []
  compiled = None
  for batch in batches():
    sharded = partitioning.shard_batch(batch, mesh, layout.rules)
    if compiled is None:  # compiled once, run for every step; tests read its HLO
      compiled = step.lower(state, sharded).compile()
    state, metrics = compiled(state, sharded)
    loss_history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return mesh, state, np.array(loss_history), compiled


@functools.cache
def one_device(model_items=(), grad_accum=1):
  layout = partitioning.load_layout("dp")
  _, state, loss_history, _ = train(
    layout, jax.devices()[:1], grad_accum, CFG.replace(**dict(model_items))
  )
  return jax.device_get(state.params), loss_history


def logical_axes_by_path(cfg=CFG):
  """Each parameter's logical axis names, keyed like the pure params dict."""
  abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  names = jax.tree.map(
    lambda v: tuple(v.get_metadata()["out_sharding"]),
    abstract,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return {
    jax.tree_util.keystr(p): n
    for p, n in jax.tree_util.tree_leaves_with_path(
      nnx.to_pure_dict(names), is_leaf=lambda x: isinstance(x, tuple)
    )
  }


DROPOUT = {"dropout": 0.2, "attention_dropout": 0.2, "dropout_prng": "hash"}
LORA = {"lora_rank": 4, "lora_targets": ("q", "k", "v", "o", "gate", "up", "down")}
# Each case: layout file, mesh size overrides, device count, the mesh expected, and optionally
# grad_accum, model field overrides, grad_reduce, and the one-device reference's grad_accum
# ("ref_accum", default 1: a plain single batch).
CASES = {
  "dp8": dict(layout="dp", devices=8, mesh={"data": 8, "fsdp": 1, "tensor": 1}),
  "fsdp8": dict(layout="fsdp", devices=8, mesh={"data": 1, "fsdp": 8, "tensor": 1}),
  "tp4": dict(layout="tp", devices=4, mesh={"data": 1, "fsdp": 1, "tensor": 4}),
  "fsdp4_tp2": dict(
    layout="fsdp_tp",
    sizes={"fsdp": 4, "tensor": 2},
    devices=8,
    mesh={"data": 1, "fsdp": 4, "tensor": 2},
  ),
  # Two microbatches against one device's single batch: accumulation on the mesh is exact.
  "dp2_fsdp2_tp2_accum2": dict(
    layout="dp_fsdp_tp", devices=8, grad_accum=2, mesh={"data": 2, "fsdp": 2, "tensor": 2}
  ),
  # Hash dropout masks on every activation and attention probability: each shard computes
  # its slice of the same global masks, so the run matches one device's with dropout.
  "dp2_fsdp2_tp2_hash_dropout": dict(
    layout="dp_fsdp_tp", devices=8, model=DROPOUT, mesh={"data": 2, "fsdp": 2, "tensor": 2}
  ),
  # LoRA adapters shard with their kernels' axes; only they train.
  "fsdp8_lora": dict(
    layout="fsdp", devices=8, model=LORA, mesh={"data": 1, "fsdp": 8, "tensor": 1}
  ),
  "tp4_lora": dict(layout="tp", devices=4, model=LORA, mesh={"data": 1, "fsdp": 1, "tensor": 4}),
  # grad_reduce 'flat': manual data parallelism with one flat all-reduce.
  "dp8_flat": dict(
    layout="dp", devices=8, grad_reduce="flat", mesh={"data": 8, "fsdp": 1, "tensor": 1}
  ),
  # ... where each device applies its rows of the whole batch's hash masks,
  "dp4_flat_hash_dropout": dict(
    layout="dp",
    sizes={"data": 4},
    devices=4,
    model=DROPOUT,
    grad_reduce="flat",
    mesh={"data": 4, "fsdp": 1, "tensor": 1},
  ),
  # ... and of each microbatch's jax.random masks, against one device accumulating the same
  # two microbatches (every other row) with the same masks.
  "dp2_flat_accum2_threefry_dropout": dict(
    layout="dp",
    sizes={"data": 2},
    devices=2,
    grad_accum=2,
    ref_accum=2,
    model=dict(DROPOUT, dropout_prng="threefry"),
    grad_reduce="flat",
    mesh={"data": 2, "fsdp": 1, "tensor": 1},
  ),
  # ... and of hash masks through scanned, rematerialized layers with query blocks.
  "dp2_flat_accum2_scan_blocks_hash_dropout": dict(
    layout="dp",
    sizes={"data": 2},
    devices=2,
    grad_accum=2,
    ref_accum=2,
    model=dict(DROPOUT, scan_layers=True, remat="full", attention_query_blocks=2),
    grad_reduce="flat",
    mesh={"data": 2, "fsdp": 1, "tensor": 1},
  ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_trains_like_one_device(case):
  c = CASES[case]
  layout, mesh, state, loss_history, _ = trained(case)
  assert dict(mesh.shape) == c["mesh"]

  ref_params, ref_losses = one_device(
    tuple(sorted(c.get("model", {}).items())),  # same model
    c.get("ref_accum", 1),
  )
  np.testing.assert_allclose(
    loss_history,
    ref_losses,
    rtol=1e-5,
    err_msg=f"{case}: the (loss, grad norm) of each step differ from one device's, so this "
    "layout computes a different function (a sharding bug, not rounding)",
  )
  got = jax.device_get(state.params)
  for (path, want), have in zip(
    jax.tree_util.tree_leaves_with_path(ref_params), jax.tree.leaves(got)
  ):
    np.testing.assert_allclose(
      have,
      want,
      rtol=1e-5,
      atol=1e-6,
      err_msg=f"{case}: {jax.tree_util.keystr(path)} after {STEPS} steps differs from one device's",
    )

  # Every parameter's shards are what the layout's rules say, shard by shard.
  rules = dict(layout.rules)
  logical = logical_axes_by_path(CFG.replace(**c.get("model", {})))
  for path, arr in jax.tree_util.tree_leaves_with_path(state.params):
    key = jax.tree_util.keystr(path)
    spec = axes.logical_to_spec(logical[key], rules)
    assert arr.sharding.spec == spec, (case, key, arr.sharding.spec, spec)
    want_shape = tuple(
      n // int(np.prod([mesh.shape[m] for m in partitioning._mesh_axes_of(entry)]))
      for n, entry in zip(arr.shape, tuple(spec) + (None,) * (arr.ndim - len(spec)))
    )
    for shard in arr.addressable_shards:
      assert shard.data.shape == want_shape, (case, key, shard.data.shape, want_shape)
  blocks = state.params["blocks"]
  q_kernel = (blocks[0] if 0 in blocks else blocks)["attn"]["q"]["kernel"]  # unscanned: by layer
  assert len(q_kernel.addressable_shards) == c["devices"]


def test_layouts_split_what_their_names_say():
  """Hand-written expectations, so a rules file that stops sharding something fails here."""
  q = (axes.EMBED, axes.HEADS, axes.HEAD_DIM)
  P = jax.sharding.PartitionSpec
  want = {
    "dp": P(None, None, None),
    "fsdp": P("fsdp", None, None),
    "tp": P(None, "tensor", None),
    "fsdp_tp": P("fsdp", "tensor", None),
    "dp_fsdp_tp": P("fsdp", "tensor", None),
  }
  batch = {
    "dp": "data",
    "fsdp": "fsdp",
    "tp": None,
    "fsdp_tp": "fsdp",
    "dp_fsdp_tp": ("data", "fsdp"),
  }
  for name in want:
    rules = dict(partitioning.load_layout(name).rules)
    assert axes.logical_to_spec(q, rules) == want[name], name
    assert partitioning.batch_spec(rules) == P(batch[name], None), name


def all_reduces(compiled):
  """The result shapes of the all-reduce instructions in a compiled step's HLO."""
  return re.findall(r"= (\S+|\(.*?\)) all-reduce\(", compiled.as_text())


def test_flat_grad_reduce_is_one_all_reduce_of_one_vector():
  """'flat' sums every gradient, the loss, the count and the metric sums with one all-reduce of
  a single vector; 'xla' reduces each gradient separately (a tuple, or one op each)."""
  params = jax.tree.leaves(trained("dp8_flat")[2].params)
  n = sum(int(np.prod(p.shape)) for p in params) + 4  # + loss sum, count, nll, accuracy
  assert all_reduces(trained("dp8_flat")[4]) == [f"f32[{n}]{{0}}"]
  per_param = all_reduces(trained("dp8")[4])
  assert per_param and f"f32[{n}]{{0}}" not in per_param
  assert sum(r.count("f32[") for r in per_param) >= len(params)


@pytest.mark.parametrize("name,sizes,devices", [("tp", {"tensor": 4}, 4), ("dp_fsdp_tp", {}, 8)])
def test_sampling_on_a_layout_matches_one_device(name, sizes, devices):
  """Prefill and bucketed KV-cache decode (kv_bucket 2: a switch between cache prefixes) on
  sharded parameters, with the layout's axis rules given to the sampler, pick one device's
  greedy tokens."""
  from model.sampling import Sampler, SamplingConfig

  cfg = CFG.replace(kv_bucket=2)
  prompts = np.random.default_rng(3).integers(1, cfg.vocab_size, size=(4, 3)).astype(np.int32)
  mask = np.ones_like(prompts)
  scfg = SamplingConfig(max_new_tokens=9, temperature=0.0)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  want = Sampler(graphdef)(params, prompts, mask, jax.random.key(0), scfg)

  layout = partitioning.load_layout(name, sizes)
  mesh = partitioning.make_mesh(layout, jax.devices()[:devices])
  graphdef, sharded, _ = partitioning.sharded_init(
    lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh, layout.rules
  )
  got = Sampler(graphdef, mesh, layout.rules)(sharded, prompts, mask, jax.random.key(0), scfg)
  np.testing.assert_array_equal(np.asarray(got.tokens_BxN), np.asarray(want.tokens_BxN))
  np.testing.assert_allclose(np.asarray(got.logprobs_BxN), np.asarray(want.logprobs_BxN), atol=1e-4)
