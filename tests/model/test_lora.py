"""LoRA adapters: at init the adapted model is the base model exactly; folding the adapters in
gives the adapted model's logits; switched off, the base's exactly; every adapter on its own
projection, with its own dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import lora
from model.config import LORA_TARGETS, preset
from model.layers import adapters_off
from model.transformer import ScalarModel, Transformer

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))


def params_of(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_params(model, params):
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def perturbed(params, scale=0.05):
  """Random adapters (lora_b is zero at init, which would make every test trivial)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for i, (path, x) in enumerate(leaves):
    named = lora.is_adapter(tuple(getattr(k, "key", k) for k in path))
    out.append(x + scale * jax.random.normal(jax.random.PRNGKey(i), x.shape) if named else x)
  return jax.tree_util.tree_unflatten(tree, out)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", ["tiny", "tiny_gpt2"])
def test_at_init_the_adapted_model_is_the_base(name, scan):
  targets = tuple(t for t in LORA_TARGETS if t != "gate" or name == "tiny")
  base_cfg = preset(name, scan_layers=scan)
  cfg = base_cfg.replace(lora_rank=4, lora_targets=targets)
  base, adapted = Transformer(base_cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(0))
  adapters, rest = lora.split(params_of(adapted), lora.is_adapter)
  same = jax.tree.map(lambda a, b: bool((a == b).all()), rest, params_of(base))
  assert all(jax.tree.leaves(same)), "the base weights are those of the model without LoRA"
  layers = 1 if scan else base_cfg.n_layers  # scanned blocks stack their layers in one array
  assert len(jax.tree.leaves(adapters)) == 2 * len(targets) * layers
  np.testing.assert_array_equal(adapted(TOKENS), base(TOKENS))


def test_merged_model_equals_the_adapted_one():
  cfg = preset("tiny").replace(lora_rank=8, lora_alpha=16.0, lora_targets=LORA_TARGETS)
  for scan in (False, True):
    c = cfg.replace(scan_layers=scan)
    adapted = with_params(
      Transformer(c, rngs=nnx.Rngs(0)), perturbed(params_of(Transformer(c, rngs=nnx.Rngs(0))))
    )
    merged, plain_cfg = lora.merge(params_of(adapted), c)
    assert plain_cfg.lora_rank == 0 and not lora.split(merged, lora.is_adapter)[0]
    plain = with_params(Transformer(plain_cfg, rngs=nnx.Rngs(1)), merged)
    want, got = adapted(TOKENS), plain(TOKENS)
    assert (
      float(jnp.abs(want - Transformer(c.replace(lora_rank=0), rngs=nnx.Rngs(0))(TOKENS)).max())
      > 0.1
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_merge_is_kernel_plus_scaled_product_by_numpy():
  cfg = preset("tiny").replace(lora_rank=4, lora_alpha=8.0, lora_targets=("q", "down"))
  params = perturbed(params_of(Transformer(cfg, rngs=nnx.Rngs(0))))
  merged, _ = lora.merge(params, cfg)
  q = params["blocks"][0]["attn"]["q"]
  a, b, w = (np.asarray(q[k], np.float64) for k in ("lora_a", "lora_b", "kernel"))
  want = w + 2.0 * np.einsum("dr,rhk->dhk", a, b)
  np.testing.assert_allclose(merged["blocks"][0]["attn"]["q"]["kernel"], want, rtol=1e-6, atol=1e-6)
  k = params["blocks"][1]["attn"]["k"]["kernel"]
  np.testing.assert_array_equal(merged["blocks"][1]["attn"]["k"]["kernel"], k)


def test_adapters_off_is_the_base_exactly():
  base_cfg = preset("tiny")
  cfg = base_cfg.replace(lora_rank=4, lora_targets=LORA_TARGETS)
  adapted = with_params(
    Transformer(cfg, rngs=nnx.Rngs(0)), perturbed(params_of(Transformer(cfg, rngs=nnx.Rngs(0))))
  )
  base = Transformer(base_cfg, rngs=nnx.Rngs(0))
  assert float(jnp.abs(adapted(TOKENS) - base(TOKENS)).max()) > 0.1
  with adapters_off():
    off = jax.jit(lambda t: adapted(t))(TOKENS)
  np.testing.assert_array_equal(off, jax.jit(lambda t: base(t))(TOKENS))  # the same program
  # A scalar model (reward model, critic) takes adapters on its trunk alike.
  scalar = ScalarModel(cfg, rngs=nnx.Rngs(0))
  assert "lora_a" in params_of(scalar)["trunk"]["blocks"][0]["attn"]["q"]


def test_adapter_dropout_drops_only_the_adapter_input():
  cfg = preset("tiny").replace(lora_rank=4, lora_dropout=0.5, lora_targets=("q", "v", "up"))
  model = with_params(
    Transformer(cfg, rngs=nnx.Rngs(0)), perturbed(params_of(Transformer(cfg, rngs=nnx.Rngs(0))))
  )
  rng = jax.random.PRNGKey(3)
  a, b = model(TOKENS, dropout_rng=rng), model(TOKENS, dropout_rng=jax.random.PRNGKey(4))
  assert float(jnp.abs(a - b).max()) > 1e-3, "adapter dropout changes with the key"
  np.testing.assert_array_equal(model(TOKENS, dropout_rng=rng), a)
  with adapters_off():  # no adapter, so nothing for its dropout to touch
    np.testing.assert_array_equal(model(TOKENS, dropout_rng=rng), model(TOKENS))
  assert model.blocks[0].attn.k.lora_a is None and model.blocks[0].mlp.down.lora_a is None


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="lora_targets has \\['qq'\\]"):
    preset("tiny").replace(lora_rank=2, lora_targets=("qq",))
  with pytest.raises(ValueError, match="lora_rank must be an int >= 0"):
    preset("tiny").replace(lora_rank=-1)
  with pytest.raises(ValueError, match="'gate', but mlp='gelu'"):
    preset("tiny_gpt2").replace(lora_rank=2, lora_targets=("gate",))
  assert preset("tiny").replace(lora_targets="q,v").lora_targets == ("q", "v")
