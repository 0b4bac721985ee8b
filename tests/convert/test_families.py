"""The open families people start from, against transformers at small size with each family's
own config fields: Llama 3 (llama3 RoPE scaling, tied), Mistral (sliding window, linear RoPE
scaling), Qwen2 (q/k/v bias, YaRN), Qwen3 (q/k norms, head_dim apart from the width, sharded)
and Gemma (GeGLU, scaled embeddings, (1 + w) norms). Each: random init, save_pretrained,
imported and exported, logits within 1e-4 both ways, greedy tokens equal generate()."""

import os

import numpy as np
import pytest
from flax import nnx

from model import convert
from tests.convert.conftest import (
  HEADS,
  KV_HEADS,
  LAYERS,
  SEQ,
  VOCAB,
  D,
  assert_greedy_equals_generate,
  hf_logits,
  randomize,
)
from tests.convert.conftest import tokens as make_tokens

TOL = 1e-4
COMMON = dict(
  vocab_size=VOCAB,
  hidden_size=D,
  intermediate_size=96,
  num_hidden_layers=LAYERS,
  num_attention_heads=HEADS,
  num_key_value_heads=KV_HEADS,
  max_position_embeddings=SEQ,
  bos_token_id=None,
  eos_token_id=None,
  pad_token_id=None,
  attn_implementation="eager",
)
# Each family's own fields, set away from their defaults where a dropped field would show.
FAMILIES = {
  "llama3": (
    "LlamaForCausalLM",
    dict(
      rms_norm_eps=1e-5,
      tie_word_embeddings=True,
      rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 5000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
      },
    ),
  ),
  "mistral": (
    "MistralForCausalLM",
    dict(
      sliding_window=6,
      head_dim=16,
      rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0},
    ),
  ),
  "qwen2": (
    "Qwen2ForCausalLM",
    dict(
      rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
      },
    ),
  ),
  "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32, rope_parameters={"rope_theta": 1e6})),
  "gemma": ("GemmaForCausalLM", dict(head_dim=32, rms_norm_eps=1e-6)),
}


def hf_model(family: str):
  import transformers

  arch, fields = FAMILIES[family]
  model_cls = getattr(transformers, arch)
  config = model_cls.config_class(**{**COMMON, **fields})
  return randomize(model_cls(config), seed=len(family))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """{family: (torch model, folder)}; qwen3 is saved sharded."""
  root = tmp_path_factory.mktemp("families")
  out = {}
  for family in FAMILIES:
    model, folder = hf_model(family), str(root / family)
    model.save_pretrained(folder, max_shard_size="100KB" if family == "qwen3" else "5GB")
    out[family] = (model, folder)
  assert os.path.exists(os.path.join(out["qwen3"][1], "model.safetensors.index.json"))
  return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_converts_both_ways_with_transformers_logits(saved, family, tmp_path):
  from transformers import AutoModelForCausalLM

  torch_model, folder = saved[family]
  cfg, model = convert.load_hf(folder, scan_layers=family == "qwen3")
  toks = make_tokens(l=20, seed=3)
  want = hf_logits(torch_model, toks)
  np.testing.assert_allclose(np.asarray(model(toks)), want, atol=TOL, rtol=0, err_msg=family)
  # Back out: transformers loads every tensor and computes the same logits.
  params = nnx.to_pure_dict(nnx.state(model))
  convert.save_hf(cfg, params, str(tmp_path))
  back, info = AutoModelForCausalLM.from_pretrained(
    str(tmp_path), output_loading_info=True, attn_implementation="eager"
  )
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert type(back).__name__ == FAMILIES[family][0]
  np.testing.assert_allclose(hf_logits(back.eval(), toks), want, atol=TOL, rtol=0, err_msg=family)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_greedy_tokens_equal_generate(saved, family):
  torch_model, folder = saved[family]
  _, model = convert.load_hf(folder)
  # 12 new tokens after 7: past the sliding window and the scaled RoPEs' original context.
  assert_greedy_equals_generate(torch_model, model, family, n=12)
