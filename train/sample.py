"""Command line: sample from a run's latest checkpoint, e.g.
python -m train.sample --workdir=DIR --prompt='ROMEO:'."""

from __future__ import annotations

from absl import flags, logging

from train import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "a training run's workdir")
_PROMPT = flags.DEFINE_string("prompt", "", "text to continue")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_NUM = flags.DEFINE_integer("num_samples", 1, "continuations to draw")
_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "tokens per continuation")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 for greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0: all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus mass (1: all)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  import numpy as np
  from flax import nnx

  from model.sampling import Sampler, SamplingConfig, left_pad
  from model.transformer import Transformer
  from train.weights import load_for_inference

  model_cfg, data_cfg, params, tok = load_for_inference(_WORKDIR.value, _STEP.value)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
  prompt = tok.encode(_PROMPT.value, bos=data_cfg.get("add_bos", True)) or [tok.start_id]
  budget = model_cfg.max_seq_len - len(prompt) if model_cfg.position == "learned" else _TOKENS.value
  if budget <= 0:
    raise ValueError(
      f"--prompt has {len(prompt)} tokens and the model's max_seq_len is "
      f"{model_cfg.max_seq_len}: no room to continue it; shorten the prompt"
    )
  cfg = SamplingConfig(
    max_new_tokens=min(_TOKENS.value, budget),
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    eos_id=tok.eos_id if data_cfg.get("add_eos", True) else None,
    pad_id=tok.pad_id,
  )
  tokens, mask = left_pad([prompt] * _NUM.value, tok.pad_id)
  out = Sampler(graphdef)(params, tokens, mask, jax.random.PRNGKey(_SEED.value), cfg)
  for row in range(_NUM.value):
    ids = np.asarray(out.tokens_BxN[row])[np.asarray(out.mask_BxN[row]) > 0]
    print(f"--- sample {row} ---\n{_PROMPT.value}{tok.decode([int(t) for t in ids])}\n")


if __name__ == "__main__":
  cli.run(main)
