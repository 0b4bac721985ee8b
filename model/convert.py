"""Hugging Face safetensors checkpoints (GPT-2, LLaMA, Mistral, Qwen2, Qwen3, Gemma) to and
from our Transformer params."""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.hf_config import architecture, family_of, hf_config_to_model, model_to_hf_config
from model.hf_files import (
  MANIFEST,
  PARAMS_FILE,
  ConversionError,
  flatten,
  load_ours,
  nest,
  read_hf,
  save_ours,
  write_hf,
)
from model.transformer import Transformer

# Buffers some HF checkpoints carry that are not weights (GPT-2 causal masks, old RoPE caches).
_BUFFERS = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")

DEBUG_ENV = "FROMSCRATCH_DEBUG"  # set, an error shows its traceback (as in train/cli.py)


class _Entry(NamedTuple):
  """One HF tensor and the unscanned param path(s) it holds. Several paths split the HF
  tensor's last axis evenly (GPT-2's fused c_attn); `transposed` marks torch Linear weights,
  stored (out, in) where our kernels are (in, out)."""

  hf_key: str
  hf_shape: tuple
  paths: tuple
  our_shape: tuple
  transposed: bool


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not argparse's usage block (--help shows that)
    self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _spec(cfg: ModelConfig, prefix: str = "transformer.") -> list[_Entry]:
  """Every HF tensor of `cfg`'s architecture, in the order HF writes them."""
  d, h, g, k, f, v = (
    cfg.d_model,
    cfg.n_heads,
    cfg.n_kv_heads,
    cfg.head_size,
    cfg.d_ff,
    cfg.vocab_size,
  )
  out, family = [], family_of(cfg)

  def add(key, hf_shape, paths, our_shape, transposed=False):
    out.append(_Entry(key, tuple(hf_shape), tuple(paths), tuple(our_shape), transposed))

  def norm(key, path, with_bias):
    add(f"{key}.weight", (d,), [path + ("scale",)], (d,))
    if with_bias:
      add(f"{key}.bias", (d,), [path + ("bias",)], (d,))

  def dense(key, in_shape, out_shape, path, n_split=1, transposed=True, bias=cfg.use_bias):
    i, o = math.prod(in_shape), math.prod(out_shape) * n_split
    paths = [path + (name,) for name in "qkv"] if n_split > 1 else [path]
    add(
      f"{key}.weight",
      (o, i) if transposed else (i, o),
      [p + ("kernel",) for p in paths],
      tuple(in_shape) + tuple(out_shape),
      transposed,
    )
    if bias:
      add(f"{key}.bias", (o,), [p + ("bias",) for p in paths], out_shape)

  if family == "gpt2":
    add(f"{prefix}wte.weight", (v, d), [("embed", "table_VxD")], (v, d))
    add(f"{prefix}wpe.weight", (cfg.max_seq_len, d), [("pos_embed_SxD",)], (cfg.max_seq_len, d))
    for i in range(cfg.n_layers):
      p, b = f"{prefix}h.{i}.", ("blocks", i)
      norm(p + "ln_1", b + ("attn_norm",), True)
      dense(p + "attn.c_attn", (d,), (h, k), b + ("attn",), n_split=3, transposed=False)
      dense(p + "attn.c_proj", (h, k), (d,), b + ("attn", "o"), transposed=False)
      norm(p + "ln_2", b + ("mlp_norm",), True)
      dense(p + "mlp.c_fc", (d,), (f,), b + ("mlp", "up"), transposed=False)
      dense(p + "mlp.c_proj", (f,), (d,), b + ("mlp", "down"), transposed=False)
    norm(f"{prefix}ln_f", ("final_norm",), True)
  else:
    add("model.embed_tokens.weight", (v, d), [("embed", "table_VxD")], (v, d))
    for i in range(cfg.n_layers):
      p, b = f"model.layers.{i}.", ("blocks", i)
      norm(p + "input_layernorm", b + ("attn_norm",), False)
      qkv_bias = cfg.use_bias or cfg.qkv_bias
      dense(p + "self_attn.q_proj", (d,), (h, k), b + ("attn", "q"), bias=qkv_bias)
      dense(p + "self_attn.k_proj", (d,), (g, k), b + ("attn", "k"), bias=qkv_bias)
      dense(p + "self_attn.v_proj", (d,), (g, k), b + ("attn", "v"), bias=qkv_bias)
      dense(p + "self_attn.o_proj", (h, k), (d,), b + ("attn", "o"))
      if cfg.qk_norm:
        add(p + "self_attn.q_norm.weight", (k,), [b + ("attn", "q_norm", "scale")], (k,))
        add(p + "self_attn.k_norm.weight", (k,), [b + ("attn", "k_norm", "scale")], (k,))
      norm(p + "post_attention_layernorm", b + ("mlp_norm",), False)
      dense(p + "mlp.gate_proj", (d,), (f,), b + ("mlp", "gate"))
      dense(p + "mlp.up_proj", (d,), (f,), b + ("mlp", "up"))
      dense(p + "mlp.down_proj", (f,), (d,), b + ("mlp", "down"))
    norm("model.norm", ("final_norm",), False)
  if not cfg.tie_embeddings:
    dense("lm_head", (d,), (v,), ("lm_head",), bias=False)
  return out


def _fail(what: str, problems: list[str]):
  if problems:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise ConversionError(f"cannot convert {what}:\n  " + "\n  ".join(shown))


def _scan(flat: dict[tuple, np.ndarray], n_layers: int) -> dict[tuple, np.ndarray]:
  """Stacks blocks/<i>/... into blocks/... with a leading layer axis (scan_layers=True)."""
  out = {p: x for p, x in flat.items() if p[0] != "blocks"}
  for p in {p[:1] + p[2:] for p in flat if p[0] == "blocks"}:
    out[p] = np.stack([flat[p[:1] + (i,) + p[1:]] for i in range(n_layers)])
  return out


def hf_to_params(
  hf_config: dict, tensors: dict[str, np.ndarray], *, scan_layers: bool = False, **overrides
) -> tuple[ModelConfig, dict]:
  """HF config + tensors -> (ModelConfig, numpy params shaped like nnx.to_pure_dict(state)).

  Every tensor is checked (missing, shape, unexpected); all problems come in one error."""
  cfg = hf_config_to_model(hf_config, scan_layers=scan_layers, **overrides)
  arch = architecture(hf_config)
  # The original GPT-2 release stores keys without the 'transformer.' prefix.
  prefix = (
    "" if "wte.weight" in tensors and "transformer.wte.weight" not in tensors else "transformer."
  )
  flat, problems, used = {}, [], set()
  for e in _spec(cfg, prefix):
    if e.hf_key not in tensors:
      problems.append(f"missing tensor {e.hf_key!r} (expected shape {e.hf_shape})")
      continue
    used.add(e.hf_key)
    w = np.asarray(tensors[e.hf_key])
    if w.shape != e.hf_shape:
      problems.append(f"tensor {e.hf_key!r} has shape {w.shape}, expected {e.hf_shape}")
      continue
    for path, part in zip(e.paths, np.split(w, len(e.paths), axis=-1)):
      flat[path] = (part.T if e.transposed else part).reshape(e.our_shape).astype(cfg.weight_dtype)
  if cfg.tie_embeddings and "lm_head.weight" in tensors:
    # Some exporters write the tied head anyway; accept it only if it really is the embedding.
    used.add("lm_head.weight")
    table = tensors.get(f"{prefix}wte.weight", tensors.get("model.embed_tokens.weight"))
    if table is None or not np.array_equal(tensors["lm_head.weight"], table):
      problems.append(
        "tensor 'lm_head.weight' differs from the token embedding, but "
        "config.json ties them (tie_word_embeddings=true)"
      )
  problems += [
    f"unexpected tensor {key!r} with shape {tuple(np.shape(tensors[key]))}"
    for key in sorted(tensors)
    if key not in used and not _BUFFERS.search(key)
  ]
  _fail(f"{arch} checkpoint", problems)
  return cfg, nest(_scan(flat, cfg.n_layers) if scan_layers else flat)


def params_to_hf(cfg: ModelConfig, params: dict) -> tuple[dict, dict[str, np.ndarray]]:
  """Our config + pure params dict (either scan layout) -> (HF config.json dict, tensors)."""
  hf_config, spec = model_to_hf_config(cfg), _spec(cfg)
  flat = {p: np.asarray(x) for p, x in flatten(params).items()}
  if cfg.scan_layers:  # unstack the leading layer axis, back to blocks/<i>/...
    flat = {
      **{p: x for p, x in flat.items() if p[0] != "blocks"},
      **{
        p[:1] + (i,) + p[1:]: x[i]
        for p, x in flat.items()
        if p[0] == "blocks"
        for i in range(x.shape[0])
      },
    }
  shapes = {path: e.our_shape for e in spec for path in e.paths}
  name = lambda p: "/".join(map(str, p))  # noqa: E731
  problems = [
    f"missing param {name(p)!r} (expected shape {s})" for p, s in shapes.items() if p not in flat
  ]
  problems += [
    f"param {name(p)!r} has shape {flat[p].shape}, expected {s}"
    for p, s in shapes.items()
    if p in flat and flat[p].shape != s
  ]
  problems += [f"unexpected param {name(p)!r}" for p in flat if p not in shapes]
  _fail(f"params to {hf_config['architectures'][0]}", problems)
  tensors = {}
  for e in spec:
    part_shape = e.hf_shape[:-1] + (e.hf_shape[-1] // len(e.paths),)
    parts = [
      flat[p].reshape(part_shape[::-1]).T if e.transposed else flat[p].reshape(part_shape)
      for p in e.paths
    ]
    tensors[e.hf_key] = np.ascontiguousarray(np.concatenate(parts, axis=-1))
  return hf_config, tensors


def build_model(cfg: ModelConfig, params: dict) -> Transformer:
  """A Transformer of `cfg` holding `params` (a pure dict, e.g. from hf_to_params)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def load_hf(hf_dir: str, *, scan_layers: bool = False, **overrides):
  """Reads an HF checkpoint folder into (ModelConfig, Transformer)."""
  cfg, params = hf_to_params(*read_hf(hf_dir), scan_layers=scan_layers, **overrides)
  return cfg, build_model(cfg, params)


def save_hf(cfg: ModelConfig, params: dict, out_dir: str, *, max_shard_size="5GB") -> None:
  """Writes our config + params as an HF folder that from_pretrained loads."""
  write_hf(out_dir, *params_to_hf(cfg, params), max_shard_size=max_shard_size)


def main(argv=None):
  parser = _Parser(prog="python -m model.convert", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF safetensors folder -> our checkpoint folder")
  imp.add_argument("--hf_dir", required=True)
  imp.add_argument("--scan_layers", action="store_true", help="stack blocks for lax.scan")
  imp.add_argument("--param_dtype", default="float32", help="float32 | bfloat16 | float16")
  exp = sub.add_parser("export", help="our checkpoint folder -> HF safetensors folder")
  exp.add_argument("--ckpt", required=True, help=f"folder with {MANIFEST} and {PARAMS_FILE}")
  exp.add_argument("--max_shard_size", default="5GB", help="e.g. 5GB, 500MB")
  for p in (parser, imp, exp):  # before or after the command; a subparser's default would
    # overwrite the main parser's value, so each keeps its own
    p.add_argument(
      "--debug",
      action="store_true",
      dest="debug_main" if p is parser else "debug",
      help=f"show an error's traceback (or set {DEBUG_ENV}=1)",
    )
  for p in (imp, exp):
    p.add_argument("--out", required=True, help="folder to write")
  args = parser.parse_args(argv)
  try:
    _convert(args)
  except (ValueError, OSError, KeyboardInterrupt) as e:  # ConversionError: names the tensor
    env = os.environ.get(DEBUG_ENV, "").lower()
    if args.debug or args.debug_main or env not in ("", "0", "false", "no"):
      raise
    if isinstance(e, KeyboardInterrupt):
      parser.exit(130)
    parser.exit(1, f"{parser.prog} {args.command}: error: {' '.join(str(e).split())}\n")


def _convert(args) -> None:
  if args.command == "import":
    cfg, params = hf_to_params(
      *read_hf(args.hf_dir), scan_layers=args.scan_layers, param_dtype=args.param_dtype
    )
    # The sentencepiece model is the data package's business: carry the file, do not parse it.
    tok = os.path.join(args.hf_dir, "tokenizer.model")
    save_ours(args.out, cfg, params, tok if os.path.exists(tok) else None)
  else:
    cfg, params, tok = load_ours(args.ckpt)
    save_hf(cfg, params, args.out, max_shard_size=args.max_shard_size)
    if tok:
      shutil.copyfile(tok, os.path.join(args.out, os.path.basename(tok)))
  print(f"{args.command}: wrote {args.out}")


if __name__ == "__main__":
  main()
