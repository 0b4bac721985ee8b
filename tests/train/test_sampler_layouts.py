"""The sampler on a run's mesh: one device's tokens, and a KV cache laid out by the layout's rules."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from model import axes
from model.config import preset
from model.sampling import KV_CACHE_AXES, Sampler, SamplingConfig, left_pad
from model.transformer import Transformer
from tests.conftest import assert_trees_close
from tests.model.conftest import TEST_INIT_STD
from train import partitioning

# 4 kv heads split over tensor 4 (tp) and 2 (dp_fsdp_tp); d_model 64 over fsdp 8; 8 prompts over
# the batch's 8 (fsdp) and 4 (data x fsdp) ways. kv_bucket 4 makes decode switch between cache
# prefixes, so each prefix's sharded attention is on the path.
CFG = preset(
  "tiny",
  n_heads=8,
  n_kv_heads=4,
  d_model=64,
  d_ff=128,
  vocab_size=256,
  kv_bucket=4,
  init_std=TEST_INIT_STD,
)
PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12], [99], [3, 1, 4, 1, 5], [2, 7], [200], [9, 9], [64]]
CASES = {
  "fsdp": ({}, 8, {"data": 1, "fsdp": 8, "tensor": 1}),
  "tp": ({"tensor": 4}, 4, {"data": 1, "fsdp": 1, "tensor": 4}),
  "dp_fsdp_tp": ({}, 8, {"data": 2, "fsdp": 2, "tensor": 2}),
}
CONFIGS = {
  "greedy": SamplingConfig(max_new_tokens=9, temperature=0.0),
  "t0.7": SamplingConfig(max_new_tokens=9, temperature=0.7),
}


def make_model():
  return Transformer(CFG, rngs=nnx.Rngs(0))


@functools.cache
def sharded(name):
  """(mesh, rules, graphdef, params) of a layout, the parameters built in their shardings."""
  sizes, devices, mesh_shape = CASES[name]
  layout = partitioning.load_layout(name, sizes)
  mesh = partitioning.make_mesh(layout, jax.devices()[:devices])
  assert dict(mesh.shape) == mesh_shape
  graphdef, params, _ = partitioning.sharded_init(make_model, mesh, layout.rules)
  return mesh, layout.rules, graphdef, params


@functools.cache
def one_device(cfg_name):
  graphdef, params = nnx.split(make_model())
  toks, mask = left_pad(PROMPTS, pad_id=0)
  return Sampler(graphdef)(params, toks, mask, jax.random.key(7), CONFIGS[cfg_name])


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(CASES))
def test_sampling_on_a_layout_matches_one_device(name, cfg_name):
  mesh, rules, graphdef, params = sharded(name)
  toks, mask = left_pad(PROMPTS, pad_id=0)
  got = Sampler(graphdef, mesh, rules)(params, toks, mask, jax.random.key(7), CONFIGS[cfg_name])
  want = one_device(cfg_name)
  np.testing.assert_array_equal(
    np.asarray(got.tokens_BxN),
    np.asarray(want.tokens_BxN),
    err_msg=f"{name} {cfg_name}: sampled tokens differ from one device's",
  )
  np.testing.assert_array_equal(np.asarray(got.mask_BxN), np.asarray(want.mask_BxN))
  np.testing.assert_allclose(
    np.asarray(got.logprobs_BxN),
    np.asarray(want.logprobs_BxN),
    rtol=1e-5,
    err_msg=f"{name} {cfg_name}: logprobs differ from one device's beyond fp32 rounding",
  )


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_cache_is_laid_out_by_the_layout_rules(name):
  """Keys and values: batch over the data axes, kv heads over tensor; the layout's own rules
  decide which, so the expectation is computed from them (and spelled out for tp)."""
  mesh, rules, graphdef, params = sharded(name)
  toks, mask = left_pad(PROMPTS, pad_id=0)
  sampler = Sampler(graphdef, mesh, rules)
  logits_BxV, cache = sampler.prefill(params, toks, mask, total_len=toks.shape[1] + 4)
  assert logits_BxV.shape == (len(PROMPTS), CFG.vocab_size)
  want = NamedSharding(mesh, axes.logical_to_spec(KV_CACHE_AXES, dict(rules)))
  for array in (cache.k_NxBxGxTxK, cache.v_NxBxGxTxK):
    assert array.shape == (
      CFG.n_layers,
      len(PROMPTS),
      CFG.n_kv_heads,
      toks.shape[1] + 4,
      CFG.head_size,
    )
    # jit reports specs without trailing Nones; padded back they must match entry by entry.
    got = array.sharding
    padded = tuple(got.spec) + (None,) * (array.ndim - len(got.spec))
    assert isinstance(got, NamedSharding) and got.mesh == mesh, (name, got)
    assert padded == tuple(want.spec), (name, got.spec, want.spec)
  P = jax.sharding.PartitionSpec
  spelled = {
    "fsdp": P(None, "fsdp", None, None, None),
    "tp": P(None, None, "tensor", None, None),
    "dp_fsdp_tp": P(None, ("data", "fsdp"), "tensor", None, None),
  }
  assert want.spec == spelled[name]
  # The same prefill on one device: sharding changes the layout, not the numbers.
  one_graphdef, one_params = nnx.split(make_model())
  want_logits, want_cache = Sampler(one_graphdef).prefill(
    one_params, toks, mask, total_len=toks.shape[1] + 4
  )
  # Within fp32 rounding of each tensor's scale: sharded matmuls sum in another order.
  assert_trees_close(
    (logits_BxV, cache.k_NxBxGxTxK, cache.v_NxBxGxTxK),
    (want_logits, want_cache.k_NxBxGxTxK, want_cache.v_NxBxGxTxK),
  )


def test_rules_are_the_samplers_not_the_callers():
  """A sampler built without a mesh ignores rules active where it is called (jit would reuse
  whichever trace came first), and one built with a mesh applies its own outside any context."""
  mesh, rules, graphdef, params = sharded("tp")
  toks, mask = left_pad(PROMPTS, pad_id=0)
  cfg = CONFIGS["greedy"]
  with axes.axis_rules(mesh, rules):
    plain = Sampler(graphdef).lower(params, toks, mask, jax.random.key(0), cfg).as_text()
  own = Sampler(graphdef, mesh, rules).lower(params, toks, mask, jax.random.key(0), cfg).as_text()
  assert "sharding_constraint" not in plain
  assert "sharding_constraint" in own and '{}, {}, {"tensor"}, {}, {}]' in own


def test_a_batch_the_mesh_does_not_split_evenly_samples_as_one_device():
  """3 prompts on a batch split 8 ways (an SFT evaluation's few replies): the sampler fills the
  batch and returns the 3 rows one device gives, greedy."""
  mesh, rules, graphdef, params = sharded("fsdp")
  toks, mask = left_pad(PROMPTS[:3], pad_id=0)
  got = Sampler(graphdef, mesh, rules)(params, toks, mask, jax.random.key(7), CONFIGS["greedy"])
  want = one_device("greedy")
  assert got.tokens_BxN.shape == (3, 9)
  np.testing.assert_array_equal(np.asarray(got.tokens_BxN), np.asarray(want.tokens_BxN)[:3])
  np.testing.assert_allclose(
    np.asarray(got.logprobs_BxN), np.asarray(want.logprobs_BxN)[:3], rtol=1e-5, atol=1e-6
  )
