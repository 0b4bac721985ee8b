"""RL throughput at the shapes of the TRL peers in docs/benchmarks.md: PPO's and GRPO's
iteration time split into rollout, scoring and update, episodes/s and rollout tokens/s; DPO's
steps/s and the one-off cost of its reference pass.

.venv/bin/python -m bench.rl --iterations 12
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

# CPU devices to split each batch over; set before JAX starts (--devices N).
DEVICES = int(sys.argv[sys.argv.index("--devices") + 1]) if "--devices" in sys.argv else 2
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
)

# The peer's shapes: a 1.05M-parameter Llama (4 layers, width 128, vocabulary 16), fp32.
SHAPE = dict(
  vocab_size=16, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=512, max_seq_len=64
)
LETTERS = "abcdefghi"  # 9 characters + 7 special ids: a vocabulary of 16


def letters_reward(records, completions):
  return [c.count("a") / 4.0 for c in completions]


def reward_checkpoint(root: str, tokenizer, model_cfg) -> str:
  """A reward model's workdir: a randomly initialised scalar model of the peer's size, saved
  as the reward-model stage saves one (TRL's peer scored with such a model too)."""
  import jax
  from flax import nnx

  from data.tokenizer import tokenizer_to_json
  from train import checkpoint as ckpt
  from train import weights

  params = nnx.to_pure_dict(nnx.state(weights.make_model("scalar", model_cfg, 1)))
  workdir = os.path.join(root, "rm")
  saver = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  items = {
    "config": {"model": {}},
    "tokenizer": tokenizer_to_json(tokenizer),
    "models": weights.models_item({"reward": ("scalar", model_cfg)}),
  }
  saver.save(1, {"reward": {"params": jax.device_get(params)}}, items)
  saver.close()
  return workdir


def ppo_config(root: str, reward: str, batch: int, response_len: int):
  import ml_collections

  from configs import base

  prompts = os.path.join(root, "prompts.jsonl")
  with open(prompts, "w") as f:
    for i in range(256):
      f.write(json.dumps({"prompt": LETTERS[i % 9 :] + LETTERS[: i % 9]}) + "\n")
  c = base.get_config()
  c.stage = "rlhf.ppo"
  c.model = base.model_config("tiny", **SHAPE)
  c.rlhf = ml_collections.ConfigDict(
    dict(
      prompts=prompts,
      reward=reward,
      batch_size=batch,
      response_len=response_len,
      max_prompt_len=13,  # a rendered prompt: <s> <|user|> 9 letters <|end|> <|assistant|>
      epochs=4,
      minibatches=4,
      exact_kl_vocab=0,
    )
  )
  c.train.update(progress=False, tensorboard=False, checkpoint_every=0, eval_every=0)
  # As the baby pretraining config runs on CPU: data parallel over the host's CPU devices
  # (--devices), gradients summed in one flat all-reduce.
  c.mesh.grad_reduce = "flat" if DEVICES > 1 else "xla"
  return c


def timed_iterations(stage, iterations: int, episodes: int) -> dict:
  """Medians over `iterations` loop iterations (after two to compile and settle) of the
  iteration's wall time and its phases, and episodes/s."""
  from tests.rlhf.test_ppo import run_iteration

  rows = []
  for i in range(iterations + 2):
    t0 = time.perf_counter()
    run_iteration(stage)
    total = time.perf_counter() - t0
    m = stage.iteration_metrics()
    if i >= 2:
      rows.append((total, m["rollout_s"], m["scoring_s"], m["update_s"], m["response_length"]))
  med = [statistics.median(col) for col in zip(*rows)]
  return {
    "episodes": episodes,
    "iteration_s": med[0],
    "rollout_s": med[1],
    "scoring_s": med[2],
    "update_s": med[3],
    "episodes_per_s": episodes / med[0],
    "rollout_tokens_per_s": episodes * med[4] / med[1],
    "params": stage.n_params,
  }


def run(iterations: int, batch: int, response_len: int) -> dict:
  from data.tokenizer import CharTokenizer
  from model.config import ModelConfig
  from train.stage import build_stage

  root = tempfile.mkdtemp()
  tok = CharTokenizer.from_text(LETTERS)
  assert tok.vocab_size == 16, tok.vocab_size
  rm = reward_checkpoint(root, tok, ModelConfig(**SHAPE))
  stage = build_stage(ppo_config(root, rm, batch, response_len), os.path.join(root, "run"))
  assert 1.0e6 < stage.n_params < 1.1e6, stage.n_params
  return {"response_len": response_len, **timed_iterations(stage, iterations, batch)}


def run_grpo(iterations: int, beta: float, prompts: int = 16, group: int = 8) -> dict:
  """GRPO at the TRL GRPOTrainer peer's shapes: 16 prompts x 8 samples of at most 4 tokens,
  one on-policy update per batch, a programmatic reward; beta 0 loads no reference."""
  from train.stage import build_stage

  root = tempfile.mkdtemp()
  c = ppo_config(root, "bench.rl:letters_reward", prompts, 4)
  c.stage = "rlhf.grpo"
  for key in ("epochs", "minibatches"):
    del c.rlhf[key]
  c.rlhf.update(group_size=group, beta=beta)
  stage = build_stage(c, os.path.join(root, "run"))
  return {"beta": beta, **timed_iterations(stage, iterations, prompts * group)}


def run_dpo(steps: int, batch: int = 64, seq_len: int = 32) -> dict:
  """DPO steps/s on 1024 pairs of letter strings (the peer model's size), and the reference
  pass's one-off cost when the stage is built."""
  import jax
  import ml_collections
  import numpy as np

  from configs import base
  from train.stage import build_stage

  root = tempfile.mkdtemp()
  rng = np.random.default_rng(0)
  with open(os.path.join(root, "pairs.jsonl"), "w") as f:
    for _ in range(1024):
      prompt, chosen, rejected = ("".join(rng.choice(list(LETTERS), n)) for n in (9, 8, 8))
      f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
  c = base.get_config()
  c.stage = "rlhf.dpo"
  c.model = base.model_config("tiny", **SHAPE)
  c.data = ml_collections.ConfigDict(
    dict(
      path=os.path.join(root, "pairs.jsonl"),
      tokenizer="char",
      seq_len=seq_len,
      batch_size=batch,
      eval_batch_size=256,
      val_fraction=0.0,
    )
  )
  c.rlhf = ml_collections.ConfigDict(dict(beta=0.1))
  c.train.update(progress=False, tensorboard=False, checkpoint_every=0, eval_every=0)
  c.mesh.grad_reduce = "flat" if DEVICES > 1 else "xla"
  stage = build_stage(c, os.path.join(root, "run"))
  step, times = stage.steps["policy"], []
  updates = (update for _ in range(steps + 2) for update in stage.updates())
  for i, (name, batch_arrays) in enumerate(updates):
    t0 = time.perf_counter()
    stage.states[name], m = step(stage.states[name], batch_arrays)
    jax.block_until_ready(m)
    if i >= 2:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  return {
    "pairs": 1024,
    "batch": batch,
    "seq_len": seq_len,
    "reference_pass_s": stage.reference_s,
    "step_s": step_s,
    "steps_per_s": 1.0 / step_s,
    "pairs_per_s": batch / step_s,
  }


def decode_rate(batch: int, new_tokens: int, repeats: int = 5) -> dict:
  """Sampler tokens/s at a batch, prompt 16 tokens, `new_tokens` new tokens (no EOS)."""
  import jax
  import numpy as np
  from flax import nnx

  from model.config import ModelConfig
  from model.sampling import Sampler, SamplingConfig
  from model.transformer import Transformer

  cfg = ModelConfig(**SHAPE)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  sampler = Sampler(graphdef)
  prompts = np.random.default_rng(0).integers(1, 16, size=(batch, 16)).astype(np.int32)
  mask = np.ones_like(prompts)
  scfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
  out = sampler(params, prompts, mask, jax.random.key(0), scfg)
  jax.block_until_ready(out)
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(sampler(params, prompts, mask, jax.random.key(r), scfg))
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times) / new_tokens
  n_params = sum(x.size for x in jax.tree.leaves(params))
  # Per decode step: 2 FLOPs per parameter per row, and every weight read once (fp32).
  return {
    "batch": batch,
    "new_tokens": new_tokens,
    "tokens_per_s": batch / step_s,
    "step_ms": step_s * 1e3,
    "gflop_per_s": 2 * n_params * batch / step_s / 1e9,
    "weight_gb_per_s": 4 * n_params / step_s / 1e9,
  }


def limits() -> dict:
  """This CPU's practical ceilings, measured in the same run: a float32 matmul's FLOP/s (all
  cores) and the bandwidth of a 256 MiB copy."""
  import numpy as np

  from train.metrics import measure_peak_flops

  a = np.ones(64 * 2**20, np.float32)
  b = np.empty_like(a)
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    np.copyto(b, a)
    times.append(time.perf_counter() - t0)
  return {
    "matmul_gflop_per_s": measure_peak_flops() / 1e9,
    "copy_gb_per_s": 2 * a.nbytes / statistics.median(times) / 1e9,  # read + write
  }


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--iterations", type=int, default=12)
  p.add_argument("--devices", type=int, default=2, help="CPU devices (data parallel)")
  args = p.parse_args()
  result = {"devices": DEVICES, "ppo": run(args.iterations, 64, 4)}
  result["grpo"] = [run_grpo(args.iterations, beta) for beta in (0.0, 0.04)]
  result["dpo"] = run_dpo(args.iterations * 2)
  result["decode"] = [decode_rate(b, 32) for b in (16, 64)]
  result["limits"] = limits()
  result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
