"""Config validation, parameter counts against closed forms, logical axes on every parameter."""

import jax
import pytest
from flax import nnx

from model import axes
from model.config import PRESETS, ModelConfig, preset
from model.transformer import Transformer
from tests.model.conftest import param_count as count


def closed_form_params(c: ModelConfig) -> int:
  d, f, v, n = c.d_model, c.d_ff, c.vocab_size, c.n_layers
  q, kv = c.n_heads * c.head_size, c.n_kv_heads * c.head_size
  bias = c.use_bias
  norm = d * (2 if (c.norm == "layernorm" and bias) else 1)
  attn = d * q + 2 * d * kv + q * d + (q + 2 * kv + d if bias else 0)
  attn += q + 2 * kv if c.qkv_bias and not bias else 0
  attn += 2 * c.head_size if c.qk_norm else 0
  mlp = (3 * d * f) if c.mlp in ("swiglu", "geglu") else (2 * d * f)
  mlp += (f + d) if bias else 0  # swiglu presets have no bias
  total = v * d + n * (2 * norm + attn + mlp) + norm
  total += c.max_seq_len * d if c.position == "learned" else 0
  total += 0 if c.tie_embeddings else d * v
  return total


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_closed_form(name):
  """eval_shape only: the 1B and 7B presets are never allocated."""
  cfg = preset(name)
  assert count(cfg) == closed_form_params(cfg)


def test_presets_match_published_counts():
  """Published sizes: GPT-2 small 124,439,808; TinyLlama 1.1B 1,100,048,384;
  LLaMA-2 7B 6,738,415,616. A change here means the preset no longer has that shape."""
  for name, published in (
    ("gpt2_124m", 124_439_808),
    ("llama_1b", 1_100_048_384),
    ("llama_7b", 6_738_415_616),
  ):
    assert count(preset(name)) == published, (
      f"preset {name!r} no longer has the published parameter count {published:,}: its shape "
      "changed, so its checkpoints and Hugging Face conversions no longer match"
    )


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", ["tiny", "tiny_gpt2", "llama_1b"])
def test_every_parameter_has_logical_axes(name, scan):
  abstract = nnx.eval_shape(lambda: Transformer(preset(name, scan_layers=scan), rngs=nnx.Rngs(0)))
  leaves = jax.tree_util.tree_leaves_with_path(
    nnx.state(abstract, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  assert leaves
  for path, var in leaves:
    names = var.get_metadata().get("out_sharding")
    where = jax.tree_util.keystr(path)
    assert names is not None, f"{where} has no logical axes"
    assert len(names) == var.get_value().ndim, f"{where}: {names} for shape {var.get_value().shape}"
    assert all(n is None or n in axes.PARAM_AXES for n in names), f"{where}: {names}"
    assert any(n is not None for n in names), f"{where} names no axis at all"
    if scan:
      assert "blocks" not in where or names[0] == axes.LAYERS, where


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("d_model", 65, "d_model"),
    ("n_kv_heads", 3, "n_kv_heads"),
    ("vocab_size", 0, "vocab_size"),
    ("n_layers", -1, "n_layers"),
    ("d_ff", 1.5, "d_ff"),
    ("max_seq_len", 0, "max_seq_len"),
    ("n_heads", 0, "n_heads"),
    ("norm", "batchnorm", "norm"),
    ("position", "alibi", "position"),
    ("mlp", "relu", "mlp"),
    ("remat", "some", "remat"),
    ("attention_impl", "flash", "attention_impl"),
    ("dtype", "float8", "dtype"),
    ("param_dtype", "int8", "param_dtype"),
    ("dropout", 1.0, "dropout"),
    ("attention_dropout", -0.1, "attention_dropout"),
    ("dropout_prng", "philox", "dropout_prng"),
    ("attention_query_blocks", 0, "attention_query_blocks"),
    ("kv_bucket", -1, "kv_bucket"),
    ("kv_bucket", True, "kv_bucket"),
    ("kv_bucket", 1.5, "kv_bucket"),
    ("norm_eps", 0.0, "norm_eps"),
    ("rope_theta", -1.0, "rope_theta"),
    ("init_std", 0.0, "init_std"),
  ],
)
def test_invalid_field_raises_naming_it(field, value, message):
  with pytest.raises(ValueError, match=message):
    preset("tiny", **{field: value})


def test_attention_dropout_needs_an_einsum_path():
  with pytest.raises(ValueError, match="attention_dropout.*cuDNN"):
    preset("tiny", attention_dropout=0.1, attention_impl="cudnn")


def test_odd_head_dim_with_rope_is_rejected():
  with pytest.raises(ValueError, match="head size"):
    ModelConfig(d_model=12, n_heads=4, n_kv_heads=4, position="rope")


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown model preset"):
    preset("gpt5")
