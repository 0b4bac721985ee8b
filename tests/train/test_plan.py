"""The layout planner: byte counts from shapes alone agree with what a built state places."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from model.config import preset
from model.transformer import Transformer
from tests.train import test_layouts
from train import plan as planlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_llama_1b_fsdp8_holds_an_eighth_of_everything():
  p = planlib.plan(preset("llama_1b"), "fsdp", 8, batch=8, seq_len=2048)
  assert p["n_params"] == 1_100_048_384, (
    "the llama_1b preset is no longer the TinyLlama 1.1B shape; update the preset or this "
    "figure knowingly"
  )
  assert p["param_bytes_total"] == 4 * p["n_params"]  # float32
  # Every dim fsdp splits (embed 2048) divides by 8, so the split is exact.
  assert p["param_bytes"] * 8 == p["param_bytes_total"]
  # AdamW's two float32 moments are sharded like the parameters; only its step counters
  # (int32 scalars) are replicated.
  assert 0 <= p["opt_bytes"] - 2 * p["param_bytes"] <= 16
  assert p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert p["groups"]["embed.table_VxD"]["shard"] == (32000, 256)
  assert p["groups"]["blocks.attn.q.kernel"]["count"] == 22


def test_plan_matches_the_shards_of_a_built_state():
  """Same layout, same model, 8 CPU devices: planned bytes are the bytes actually placed."""
  layout, mesh, state, _, _ = test_layouts.trained("fsdp8")
  p = planlib.plan(test_layouts.CFG, layout, 8, batch=test_layouts.BATCH, seq_len=test_layouts.SEQ)
  for device in range(8):
    placed = sum(x.addressable_shards[device].data.nbytes for x in jax.tree.leaves(state.params))
    assert placed == p["param_bytes"]
    placed_opt = sum(
      x.addressable_shards[device].data.nbytes for x in jax.tree.leaves(state.opt_state)
    )
    assert placed_opt == p["opt_bytes"]
  assert p["param_bytes"] * 8 == p["param_bytes_total"]


def test_activation_estimate_formula():
  cfg = preset("tiny")  # D 64, H 4, G 2, K 16, F 128, V 256, N 2, float32
  one = planlib.plan(cfg, "dp", 1, batch=1, seq_len=8)["activation_bytes"]
  # Per token: layer = 4 * (4*64 + 2*64 + 2*32 + 3*128) + 3*4*4*8 = 3712 bytes, twice (2
  # layers), plus the head 2*4*256 + 3*4*64 = 2816; 8 tokens.
  assert one == 8 * (2 * 3712 + 2816), "the documented formula in train/plan.py changed"
  # dp over 8 devices: each holds an eighth of 8 rows' activations, i.e. one row's.
  assert planlib.plan(cfg, "dp", 8, batch=8, seq_len=8)["activation_bytes"] == one
  by_remat = {
    r: planlib.plan(cfg.replace(remat=r), "dp", 1, 1, 512)["activation_bytes"]
    for r in ("none", "dots", "full")
  }
  assert by_remat["full"] < by_remat["dots"] < by_remat["none"]
  flash = planlib.plan(cfg.replace(attention_impl="cudnn"), "dp", 1, 1, 512)
  assert flash["activation_bytes"] < by_remat["none"]


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_activation_estimate_matches_compiled_temp_bytes(remat):
  """Against what XLA actually allocates: the temp bytes of a compiled gradient of 4 scanned
  layers at sequence 512 (XLA:CPU; measured 7-14% above the estimate)."""
  cfg = preset("tiny", remat=remat, scan_layers=True, n_layers=4, max_seq_len=512)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  toks = jnp.ones((1, 512), jnp.int32)
  grad = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(toks).sum()))
  temp = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
  est = planlib.plan(cfg, "dp", 1, batch=1, seq_len=512)["activation_bytes"]
  assert 0.8 < temp / est < 1.25, (
    f"compiled temp {temp / 2**20:.1f} MiB against the estimate {est / 2**20:.1f} MiB: the "
    "estimate in train/plan.py no longer describes what XLA keeps for the backward pass"
  )


def test_report_shows_layouts_that_cannot_work_as_error_lines():
  text = planlib.report(preset("llama_1b"), planlib.LAYOUTS, [8, 256], batch=16, seq_len=128)
  assert "fsdp on 8 devices (mesh data=1 fsdp=8 tensor=1)" in text
  # 4 kv heads cannot split over tensor=8; 16 rows cannot split over fsdp=256.
  assert (
    "tp on 8 devices: ERROR parameter ['blocks'][0]['attn']['k']['kernel'] "
    "(2048, 4, 64): dim 1 ('kv_heads', size 4)"
  ) in text
  assert "fsdp on 256 devices: ERROR batch of 16 rows" in text
  assert len(text.splitlines()) > 20


def test_command_line():
  """A preset, a model override on top of it, and mesh sizes for the chosen layout."""
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "train.plan",
      "--preset=tiny",
      "--devices=8,16",
      "--layouts=fsdp_tp,dp",
      "--config.model.remat=full",
      "--config.mesh.layout=fsdp_tp",
      "--config.mesh.tensor=2",
      "--config.mesh.fsdp=4",
      "--config.data.batch_size=32",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
  )
  assert out.returncode == 0, out.stderr
  assert "remat=full" in out.stdout
  assert "fsdp_tp on 8 devices (mesh data=1 fsdp=4 tensor=2)" in out.stdout
  assert "fsdp_tp on 16 devices: ERROR mesh {'data': 1, 'fsdp': 4, 'tensor': 2}" in out.stdout
  assert "dp on 16 devices (mesh data=16 fsdp=1 tensor=1)" in out.stdout


@pytest.mark.parametrize("name", ["llama_1b", "llama_7b"])
def test_lora_plans_gradients_and_optimizer_for_the_adapters_alone(name):
  """Against a count by hand: r (in + out) values per adapted projection per layer, with
  gradients of that size and AdamW's two moments, beside full fine-tuning's."""
  base = preset(name)
  cfg = base.replace(lora_rank=8, lora_targets=("q", "k", "v", "o", "gate", "up", "down"))
  d, f, kv = base.d_model, base.d_ff, base.n_kv_heads * base.head_size
  per_layer = 8 * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3)
  adapters = base.n_layers * per_layer
  lora_plan = planlib.plan(cfg, "dp", 8, 8, 512)
  full = planlib.plan(base, "dp", 8, 8, 512)
  assert lora_plan["n_trained"] == adapters
  assert lora_plan["grad_bytes"] == 4 * adapters  # dp: each device holds all of them
  assert lora_plan["opt_bytes"] == 2 * 4 * adapters + 8  # mu, nu; Adam's and the schedule's counts
  assert full["grad_bytes"] == full["param_bytes"] == 4 * full["n_params"]
  assert lora_plan["param_bytes"] == full["param_bytes"] + 4 * adapters
  assert lora_plan["total_bytes"] < full["total_bytes"] - 2.9 * full["param_bytes"]
  text = planlib.format_plan(lora_plan, cfg)
  assert f"{adapters:,} of" in text and "full fine-tuning" in text


# Open checkpoints' presets: parameter totals of the released models, counted the same by
# transformers from the config.json we would write (on the meta device: no memory).
OPEN_PRESETS = {
  "llama3_2_1b": ("LlamaForCausalLM", 1_235_814_400, 973_146_112),
  "qwen2_5_0_5b": ("Qwen2ForCausalLM", 494_032_768, 357_898_112),
  "qwen3_0_6b": ("Qwen3ForCausalLM", 596_049_920, 440_467_456),
}


@pytest.mark.parametrize("name", list(OPEN_PRESETS))
def test_open_model_presets_have_their_published_parameter_counts(name):
  import torch
  import transformers

  from model.hf_config import model_to_hf_config

  arch, total, non_embedding = OPEN_PRESETS[name]
  cfg = preset(name)
  p = planlib.plan(cfg, "fsdp", 8, batch=8, seq_len=512)
  assert p["n_params"] == total
  assert p["n_params"] - cfg.vocab_size * cfg.d_model == non_embedding
  model_cls = getattr(transformers, arch)
  with torch.device("meta"):
    hf = model_cls(model_cls.config_class(**model_to_hf_config(cfg)))
  assert sum(x.numel() for x in hf.parameters()) == total
  # The model cards' rounded figures: 1.24B (Llama 3.2 1B), 0.49B and 0.36B non-embedding
  # (Qwen2.5-0.5B), 0.6B and 0.44B non-embedding (Qwen3-0.6B).
  published = {"llama3_2_1b": (1.24, None), "qwen2_5_0_5b": (0.49, 0.36), "qwen3_0_6b": (0.6, 0.44)}
  want_total, want_non = published[name]
  assert round(total / 1e9, len(str(want_total)) - 2) == want_total
  assert want_non is None or round(non_embedding / 1e9, 2) == want_non
