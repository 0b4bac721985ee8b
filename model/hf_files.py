"""Checkpoint folders on disk: Hugging Face safetensors (sharded index included) and ours."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from model.config import ModelConfig

HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
# Our on-disk checkpoint (until train/checkpoint.py defines one): a manifest JSON naming the
# ModelConfig, the params file and the tokenizer; params keys are '/'-joined pure-dict paths
# ('blocks/0/attn/q/kernel', or 'blocks/attn/q/kernel' with a leading layer axis when scanned).
MANIFEST, PARAMS_FILE, FORMAT = "fromscratch.json", "params.safetensors", "fromscratch-params/1"


class ConversionError(ValueError):
  """A checkpoint, config or params tree that cannot be converted; the message says which."""


def nest(flat: dict[tuple, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def flatten(tree, prefix=()) -> dict[tuple, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  return {p: x for key, sub in tree.items() for p, x in flatten(sub, prefix + (key,)).items()}


def read_config(hf_dir: str) -> dict:
  """config.json alone: what the model is, without reading a tensor."""
  path = os.path.join(hf_dir, HF_CONFIG)
  if not os.path.exists(path):
    raise ConversionError(f"{path} does not exist: not a Hugging Face checkpoint folder")
  return _read_json(path)


def read_hf(hf_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
  """config.json and every tensor of model.safetensors or of the shards its index names."""
  path, index = os.path.join(hf_dir, HF_CONFIG), os.path.join(hf_dir, HF_INDEX)
  if not os.path.exists(path):
    raise ConversionError(f"{path} does not exist: not a Hugging Face checkpoint folder")
  if os.path.exists(index):
    files = sorted(set(_read_json(index)["weight_map"].values()))
  elif os.path.exists(os.path.join(hf_dir, HF_WEIGHTS)):
    files = [HF_WEIGHTS]
  else:
    raise ConversionError(
      f"{hf_dir} has neither {HF_WEIGHTS} nor {HF_INDEX} (only safetensors "
      "checkpoints are read; re-save others with save_pretrained)"
    )
  tensors = {}
  for name in files:
    tensors.update(load_file(os.path.join(hf_dir, name)))
  return _read_json(path), tensors


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value):
  with open(path, "w") as f:
    json.dump(value, f, indent=2)


def parse_size(size: int | str) -> int:
  """Bytes from an int or a string like '500MB', '5GB' (decimal units, as transformers)."""
  m = re.fullmatch(r"(\d+)([KMG]?)B?", str(size).strip().upper())
  if not m:
    raise ValueError(f"cannot parse size {size!r}; write e.g. 5GB, 500MB or a byte count")
  return int(m.group(1)) * 1000 ** " KMG".index(m.group(2) or " ")


def write_hf(
  out_dir: str,
  hf_config: dict,
  tensors: dict[str, np.ndarray],
  *,
  max_shard_size: int | str = "5GB",
) -> list[str]:
  """Writes config.json and the weights, sharded with an index above `max_shard_size`.

  Weight files of an earlier export in out_dir are removed first: from_pretrained would read a
  stale index or shard alongside the new ones. Returns the weight file names.
  """
  limit = parse_size(max_shard_size)
  os.makedirs(out_dir, exist_ok=True)
  for name in os.listdir(out_dir):
    if name == HF_INDEX or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", name):
      os.remove(os.path.join(out_dir, name))
  _write_json(os.path.join(out_dir, HF_CONFIG), hf_config)
  shards, size = [[]], 0
  for key, x in tensors.items():
    if shards[-1] and size + x.nbytes > limit:
      shards, size = shards + [[]], 0
    shards[-1].append(key)
    size += x.nbytes
  n = len(shards)
  names = (
    [HF_WEIGHTS] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
  )
  for name, keys in zip(names, shards):
    # transformers expects the 'format' metadata that torch's save_file writes.
    save_file({k: tensors[k] for k in keys}, os.path.join(out_dir, name), metadata={"format": "pt"})
  if n > 1:
    _write_json(
      os.path.join(out_dir, HF_INDEX),
      {
        "metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
        "weight_map": {k: name for name, keys in zip(names, shards) for k in keys},
      },
    )
  return names


def save_ours(out_dir: str, cfg: ModelConfig, params: dict, tokenizer: str | None = None):
  """Writes our checkpoint folder (see MANIFEST); `tokenizer` is a file copied in as is."""
  os.makedirs(out_dir, exist_ok=True)
  save_file(
    {"/".join(map(str, p)): np.ascontiguousarray(x) for p, x in flatten(params).items()},
    os.path.join(out_dir, PARAMS_FILE),
  )
  if tokenizer:
    shutil.copyfile(tokenizer, os.path.join(out_dir, os.path.basename(tokenizer)))
  _write_json(
    os.path.join(out_dir, MANIFEST),
    {
      "format": FORMAT,
      "model_config": dataclasses.asdict(cfg),
      "params": PARAMS_FILE,
      "tokenizer": tokenizer and os.path.basename(tokenizer),
    },
  )


def load_ours(ckpt_dir: str) -> tuple[ModelConfig, dict, str | None]:
  """Reads our checkpoint folder: (ModelConfig, pure params dict, tokenizer path or None)."""
  if not os.path.isfile(os.path.join(ckpt_dir, MANIFEST)):
    raise ConversionError(
      f"{ckpt_dir} has no {MANIFEST}: not a folder that `python -m model.convert import` wrote"
      + (
        " (a training workdir exports with python -m train.export --workdir=DIR --out=OUT)"
        if os.path.isdir(os.path.join(ckpt_dir, "checkpoints"))
        else ""
      )
    )
  manifest = _read_json(os.path.join(ckpt_dir, MANIFEST))
  if manifest.get("format") != FORMAT:
    raise ConversionError(
      f"{ckpt_dir}/{MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT!r}"
    )
  flat = load_file(os.path.join(ckpt_dir, manifest["params"]))
  # Integer path parts are layer indices (pure dicts key unscanned blocks by int).
  params = nest(
    {tuple(int(s) if s.isdigit() else s for s in k.split("/")): x for k, x in flat.items()}
  )
  tok = manifest.get("tokenizer")
  return ModelConfig(**manifest["model_config"]), params, tok and os.path.join(ckpt_dir, tok)
