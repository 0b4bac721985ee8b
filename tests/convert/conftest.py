"""Tiny random Hugging Face models (the independent reference), saved once per session."""

import os

import numpy as np
import pytest

VOCAB, D, LAYERS, HEADS, KV_HEADS, SEQ = 256, 64, 2, 4, 2, 64


def randomize(model, seed=0, std=0.1, matrix_std=0.3):
  """Every weight random, norms near 1: HF's init zeroes biases and sets norm scales to 1,
  which would hide a bias or norm mapped to the wrong place. Block matrices get a larger std
  so the blocks, not the tied embedding, decide the next token (else greedy just repeats)."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_table = "wte" in name or "wpe" in name or "embed_tokens" in name or "lm_head" in name
      noise = torch.randn(p.shape, generator=gen) * (std if p.ndim == 1 or is_table else matrix_std)
      is_norm_scale = p.ndim == 1 and ("ln_" in name or "norm" in name) and name.endswith("weight")
      p.copy_(1.0 + noise if is_norm_scale else noise)
  return model.eval()


def hf_gpt2():
  from transformers import GPT2Config, GPT2LMHeadModel

  cfg = GPT2Config(
    vocab_size=VOCAB,
    n_embd=D,
    n_layer=LAYERS,
    n_head=HEADS,
    n_positions=SEQ,
    bos_token_id=None,
    eos_token_id=None,
    attn_implementation="eager",
  )
  return randomize(GPT2LMHeadModel(cfg), seed=1)


def hf_llama():
  # rope_theta and eps differ from the defaults so a dropped field would show up.
  from transformers import LlamaConfig, LlamaForCausalLM

  cfg = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=D,
    intermediate_size=128,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=SEQ,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    bos_token_id=None,
    eos_token_id=None,
    attn_implementation="eager",
  )
  return randomize(LlamaForCausalLM(cfg), seed=2)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
  """{'gpt2': (torch model, folder), 'llama': ...}; llama is saved sharded with an index."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for name, make, shard in (("gpt2", hf_gpt2, "5GB"), ("llama", hf_llama, "100KB")):
    model = make()
    folder = str(root / name)
    model.save_pretrained(folder, max_shard_size=shard)
    out[name] = (model, folder)
  assert os.path.exists(os.path.join(out["llama"][1], "model.safetensors.index.json")), (
    "the llama checkpoint should be sharded so the index path is tested"
  )
  return out


def tokens(b=2, l=16, seed=0):
  """A batch whose rows differ, so a batch-mixing bug cannot hide."""
  toks = np.random.default_rng(seed).integers(0, VOCAB, size=(b, l)).astype(np.int32)
  assert len({tuple(r) for r in toks}) == b
  return toks


def hf_logits(model, toks):
  import torch

  with torch.no_grad():
    return model(torch.as_tensor(toks, dtype=torch.long)).logits.numpy()


def assert_greedy_equals_generate(torch_model, model, what: str, n: int = 12):
  """Our KV-cache sampler's greedy tokens for two prompts equal transformers' generate()."""
  import jax
  import torch
  from flax import nnx

  from model.sampling import Sampler, SamplingConfig

  prompts = tokens(b=2, l=7, seed=5)
  with torch.no_grad():
    want = torch_model.generate(
      torch.as_tensor(prompts, dtype=torch.long),
      attention_mask=torch.ones(prompts.shape, dtype=torch.long),
      do_sample=False,
      max_new_tokens=n,
      min_new_tokens=n,
      pad_token_id=0,
    ).numpy()[:, prompts.shape[1] :]
  graphdef, state = nnx.split(model)
  out = Sampler(graphdef)(
    state,
    prompts,
    np.ones_like(prompts),
    jax.random.key(0),
    SamplingConfig(max_new_tokens=n, temperature=0.0),
  )
  assert want.shape == (2, n)
  np.testing.assert_array_equal(
    np.asarray(out.tokens_BxN), want, err_msg=f"{what}: greedy tokens differ from generate()"
  )
