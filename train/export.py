"""Command line: a run's language model as a Hugging Face folder (config.json and safetensors,
which transformers' from_pretrained loads) or in model/convert.py's own format, with any LoRA
adapters folded into their kernels:

python -m train.export --workdir=runs/sft_lora --out=exported [--format=hf|ours]"""

from __future__ import annotations

from absl import flags, logging

from train import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "a training run's workdir")
_OUT = flags.DEFINE_string("out", None, "folder to write")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_STATE = flags.DEFINE_string("state", "", "which of the run's models (default: its LM)")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "ours"], "hf: safetensors for transformers")
_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "largest safetensors file, e.g. 500MB")
flags.mark_flags_as_required(["workdir", "out"])


def export(workdir: str, out: str, fmt: str = "hf", step=None, state: str = "", shard="5GB"):
  """Writes the run's model (adapters folded in) to `out`; returns its ModelConfig."""
  from model import convert, hf_files
  from train.weights import load_for_inference

  cfg, _, params, _ = load_for_inference(workdir, step, state=state)
  if "trunk" in params:
    raise ValueError(
      f"{workdir} holds a scalar-head model (reward model, critic or classifier): only "
      f"language models export; name the LM with --state"
    )
  if fmt == "hf":
    convert.save_hf(cfg, params, out, max_shard_size=shard)
  else:
    hf_files.save_ours(out, cfg, params, None)
  return cfg


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cfg = export(_WORKDIR.value, _OUT.value, _FORMAT.value, _STEP.value, _STATE.value, _SHARD.value)
  print(f"export: wrote {_OUT.value} ({_FORMAT.value}, {cfg.n_layers} layers)")


if __name__ == "__main__":
  cli.run(main)
