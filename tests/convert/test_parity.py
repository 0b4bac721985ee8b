"""Golden parity with transformers (torch, CPU): logits both ways, greedy generation, CLI."""

import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from model import convert, hf_files
from model.config import ModelConfig
from model.transformer import Transformer
from tests.convert.conftest import VOCAB, assert_greedy_equals_generate, hf_logits, tokens

TOL = 1e-4  # fp32 on both sides; a larger gap means a weight or numeric is mapped wrongly


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("scan", [False, True])
def test_import_logits_match_transformers(hf_dirs, arch, scan):
  hf_model, folder = hf_dirs[arch]
  cfg, model = convert.load_hf(folder, scan_layers=scan)
  assert cfg.scan_layers == scan
  toks = tokens()
  want = hf_logits(hf_model, toks)
  got = np.asarray(model(toks))
  assert got.shape == want.shape == (2, 16, VOCAB)
  np.testing.assert_allclose(
    got, want, atol=TOL, rtol=0, err_msg=f"{arch} logits after import differ from transformers"
  )


# Ours -> HF: the exported config has to rebuild the same architecture in transformers.
EXPORT_CONFIGS = {
  "gpt2": ModelConfig(
    vocab_size=VOCAB,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=4,
    d_ff=192,
    max_seq_len=32,
    norm="layernorm",
    norm_eps=1e-5,
    position="learned",
    mlp="gelu",
    use_bias=True,
    tie_embeddings=True,
  ),
  "llama": ModelConfig(
    vocab_size=VOCAB,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=96,
    max_seq_len=32,
    norm_eps=1e-6,
    rope_theta=1000.0,
    scan_layers=True,
  ),
}


@pytest.mark.parametrize("arch,shard", [("gpt2", "5GB"), ("llama", "60KB")])
def test_export_logits_match_transformers(tmp_path, arch, shard):
  from transformers import AutoModelForCausalLM

  cfg = EXPORT_CONFIGS[arch]
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))
  # Biases start at zero and norm scales at one; perturb everything so each must map right.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(
    treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )
  convert.save_hf(cfg, params, str(tmp_path), max_shard_size=shard)
  sharded = os.path.exists(tmp_path / "model.safetensors.index.json")
  assert sharded == (shard != "5GB")
  hf_model, info = AutoModelForCausalLM.from_pretrained(
    str(tmp_path), output_loading_info=True, attn_implementation="eager"
  )
  # A missing key would be silently random-initialised by transformers.
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert type(hf_model).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[arch]
  toks = tokens(l=20, seed=3)
  ours = np.asarray(convert.build_model(cfg, params)(toks))
  np.testing.assert_allclose(
    hf_logits(hf_model.eval(), toks),
    ours,
    atol=TOL,
    rtol=0,
    err_msg=f"transformers' logits of our exported {arch} differ",
  )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_continuation_matches_generate(hf_dirs, arch):
  hf_model, folder = hf_dirs[arch]
  _, model = convert.load_hf(folder, scan_layers=arch == "llama")
  assert_greedy_equals_generate(hf_model, model, arch)


def test_cli_round_trip_is_lossless_and_copies_tokenizer(hf_dirs, tmp_path):
  _, folder = hf_dirs["llama"]
  src = tmp_path / "hf"
  src.mkdir()
  for name in os.listdir(folder):
    (src / name).write_bytes((open(os.path.join(folder, name), "rb")).read())
  (src / "tokenizer.model").write_bytes(b"\x0a\x03spm-bytes")  # copied as is, never parsed
  ours, back = tmp_path / "ours", tmp_path / "back"
  convert.main(["import", f"--hf_dir={src}", f"--out={ours}", "--scan_layers"])
  cfg, params, tok = hf_files.load_ours(str(ours))
  assert cfg.scan_layers and cfg.n_kv_heads == 2 and cfg.rope_theta == 500.0
  assert params["blocks"]["attn"]["k"]["kernel"].shape == (2, 64, 2, 16)
  assert tok == str(ours / "tokenizer.model")
  convert.main(["export", f"--ckpt={ours}", f"--out={back}", "--max_shard_size=50KB"])
  _, original = hf_files.read_hf(str(src))
  _, exported = hf_files.read_hf(str(back))
  assert (back / "model.safetensors.index.json").exists()
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  assert (back / "tokenizer.model").read_bytes() == b"\x0a\x03spm-bytes"
  assert load_file(str(ours / "params.safetensors"))["embed/table_VxD"].shape == (VOCAB, 64)


def test_original_gpt2_layout_and_bf16_checkpoints_convert(hf_dirs):
  """The first GPT-2 release has no 'transformer.' prefix and stores causal-mask buffers;
  bf16 checkpoints load into fp32 params exactly, or stay bf16 when asked."""
  hf_config, tensors = hf_files.read_hf(hf_dirs["gpt2"][1])
  _, want = convert.hf_to_params(hf_config, tensors)
  legacy = {k.removeprefix("transformer."): v for k, v in tensors.items()}
  legacy.update(
    {f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 64, 64), np.float32)) for i in range(2)}
  )
  _, got = convert.hf_to_params(hf_config, legacy)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  bf16 = {k: v.astype(jax.numpy.bfloat16) for k, v in tensors.items()}
  cfg, up = convert.hf_to_params(hf_config, bf16)
  assert cfg.param_dtype == "float32" and up["embed"]["table_VxD"].dtype == np.float32
  np.testing.assert_array_equal(up["embed"]["table_VxD"], bf16["transformer.wte.weight"])
  cfg, kept = convert.hf_to_params(hf_config, bf16, param_dtype="bfloat16")
  assert kept["blocks"][1]["mlp"]["up"]["kernel"].dtype == jax.numpy.bfloat16
