"""Conversion errors name the tensor, field or architecture a user has to fix."""

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from model import convert, hf_files
from model.config import ModelConfig, preset
from model.hf_config import hf_config_to_model, model_to_hf_config
from model.transformer import Transformer


@pytest.fixture(scope="module")
def llama():
  """A valid LLaMA (GQA 4/2) config.json dict and tensors, made without torch."""
  cfg = preset("tiny")
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))
  return convert.params_to_hf(cfg, params)


def convert_llama(hf_config, tensors):
  return convert.hf_to_params(hf_config, tensors)


def test_valid_llama_converts(llama):
  cfg, params = convert_llama(*llama)
  assert (cfg.n_heads, cfg.n_kv_heads) == (4, 2)
  assert params["blocks"][1]["attn"]["k"]["kernel"].shape == (64, 2, 16)


def test_missing_tensor_is_named_with_its_shape(llama):
  hf_config, tensors = llama
  tensors = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.down_proj.weight"}
  with pytest.raises(
    convert.ConversionError,
    match=r"missing tensor 'model.layers.1.mlp.down_proj.weight' "
    r"\(expected shape \(64, 128\)\)",
  ):
    convert_llama(hf_config, tensors)


def test_wrong_shape_names_tensor_and_both_shapes(llama):
  hf_config, tensors = llama
  tensors = {**tensors, "model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}
  with pytest.raises(
    ValueError,
    match=r"tensor 'model.layers.0.self_attn.k_proj.weight' has "
    r"shape \(64, 64\), expected \(32, 64\)",
  ):
    convert_llama(hf_config, tensors)


def test_unexpected_tensor_is_named(llama):
  hf_config, tensors = llama
  tensors = {**tensors, "model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}
  with pytest.raises(
    ValueError,
    match=r"unexpected tensor "
    r"'model.layers.0.self_attn.q_norm.weight' with shape",
  ):
    convert_llama(hf_config, tensors)


def test_tied_config_with_different_lm_head_is_rejected(llama):
  hf_config, tensors = llama
  tensors = dict(tensors)
  tensors.pop("lm_head.weight")
  convert_llama({**hf_config, "tie_word_embeddings": True}, tensors)  # tied: no head, fine
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
  with pytest.raises(ValueError, match=r"'lm_head.weight' differs from the token embedding"):
    convert_llama({**hf_config, "tie_word_embeddings": True}, tensors)


def test_unsupported_architecture_names_it_and_the_supported_ones(llama):
  hf_config, tensors = llama
  with pytest.raises(
    ValueError,
    match=r"unsupported architecture \['BertForMaskedLM'\].*"
    r"GPT2LMHeadModel, LlamaForCausalLM",
  ):
    convert_llama(
      {**hf_config, "architectures": ["BertForMaskedLM"], "model_type": "bert"}, tensors
    )


@pytest.mark.parametrize(
  "field,value,named",
  [
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "rope_type"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 5e5}, "rope_type"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7}, "mscale"),
    ("rope_parameters", {"rope_theta": 1e4, "partial_rotary_factor": 0.5}, "partial_rotary"),
    ("hidden_act", "gelu", "hidden_act"),
    ("attention_bias", True, "attention_bias"),  # with mlp_bias false: use_bias is all or none
  ],
)
def test_unsupported_llama_settings_name_the_field(llama, field, value, named):
  hf_config, tensors = llama
  with pytest.raises(ValueError, match=rf"LlamaForCausalLM config.json has {named}.*not supported"):
    convert_llama({**hf_config, field: value}, tensors)


def test_a_llama3_rope_without_its_fields_names_the_missing_one(llama):
  hf_config, tensors = llama
  rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
  with pytest.raises(ValueError, match=r"lacks the required field 'original_max_position_embed"):
    convert_llama({**hf_config, "rope_parameters": rope}, tensors)


def test_qwen_sliding_window_on_some_layers_only_is_refused(llama):
  hf_config, _ = llama
  qwen = {
    **hf_config,
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "use_sliding_window": True,
    "sliding_window": 8,
    "layer_types": ["full_attention", "sliding_attention"],
  }
  with pytest.raises(ValueError, match=r"Qwen2ForCausalLM config.json has layer_types=.*all or"):
    hf_config_to_model(qwen)


@pytest.mark.parametrize(
  "field,value", [("activation_function", "relu"), ("scale_attn_by_inverse_layer_idx", True)]
)
def test_unsupported_gpt2_settings_name_the_field(field, value):
  hf_config = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "vocab_size": 256,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    field: value,
  }
  with pytest.raises(ValueError, match=rf"GPT2LMHeadModel config.json has {field}="):
    convert.hf_to_params(hf_config, {})


def test_missing_config_field_is_named():
  with pytest.raises(ValueError, match=r"required field 'n_embd'"):
    hf_config_to_model({"model_type": "gpt2", "vocab_size": 256})


def test_export_of_an_architecture_hf_lacks_is_refused():
  cfg = ModelConfig(norm="layernorm", position="rope", mlp="gelu")
  with pytest.raises(
    ValueError,
    match=r"no Hugging Face architecture matches "
    r"norm='layernorm', position='rope'.*GPT2LMHeadModel",
  ):
    model_to_hf_config(cfg)
  with pytest.raises(
    ValueError,
    match=r"GPT2LMHeadModel has no grouped-query attention: "
    r"n_kv_heads=2",
  ):
    model_to_hf_config(preset("tiny_gpt2", n_kv_heads=2))


def test_export_names_the_bad_param():
  cfg = preset("tiny", scan_layers=True)
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))
  params["blocks"]["attn"]["q"]["kernel"] = np.zeros((2, 64, 4, 8), np.float32)
  del params["final_norm"]
  with pytest.raises(ValueError) as err:
    convert.params_to_hf(cfg, params)
  msg = str(err.value)
  assert "missing param 'final_norm/scale' (expected shape (64,))" in msg
  assert "param 'blocks/0/attn/q/kernel' has shape (64, 4, 8), expected (64, 4, 16)" in msg


def test_folder_without_safetensors_is_explained(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(
    ValueError,
    match=r"neither model.safetensors nor "
    r"model.safetensors.index.json",
  ):
    hf_files.read_hf(str(tmp_path))


def test_importing_convert_does_not_import_torch():
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  code = "import sys, model.convert; assert 'torch' not in sys.modules, 'torch was imported'"
  subprocess.run(
    [sys.executable, "-c", code], cwd=root, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
  )
