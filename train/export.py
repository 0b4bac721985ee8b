"""Command line: a run's language model as a Hugging Face folder (config.json and safetensors,
which transformers' from_pretrained loads) or in model/convert.py's own format, with any LoRA
adapters folded into their kernels:

python -m train.export --workdir=runs/sft_lora --out=exported [--format=hf|ours]"""

from __future__ import annotations

from absl import flags, logging

from train import cli


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


def main():
  # Flags are defined here, not on import: train.sample and train.chat define some of the same
  # names, and a process (a test) may import them all.
  workdir = flags.DEFINE_string("workdir", None, "a training run's workdir")
  out = flags.DEFINE_string("out", None, "folder to write")
  step = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
  state = flags.DEFINE_string("state", "", "which of the run's models (default: its LM)")
  fmt = flags.DEFINE_enum("format", "hf", ["hf", "ours"], "hf: safetensors for transformers")
  shard = flags.DEFINE_string("max_shard_size", "5GB", "largest safetensors file, e.g. 500MB")
  flags.mark_flags_as_required(["workdir", "out"])

  def run(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    cfg = export(workdir.value, out.value, fmt.value, step.value, state.value, shard.value)
    print(f"export: wrote {out.value} ({fmt.value}, {cfg.n_layers} layers)")

  cli.run(run)


if __name__ == "__main__":
  main()
