"""Runs of `python -m train.main` for the fault tests: each stage's data made once, a run
started, waited on, interrupted, and read back (losses per step, final parameters)."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp

from data import corpus
from tests.rlhf.test_reward import all_sum_pairs, sum_pairs
from tests.train.test_sft import reversal_chats

# The fault runs compare with one another only, so they may compile with XLA:CPU's LLVM
# optimisation off: their tiny programs spend more time compiling than running. (Not the whole
# suite: two programs that compute the same logprobs then differ in their last bits, and tests
# that a first PPO/GRPO update has KL exactly 0 rightly fail.)
FAST_COMPILE = "--xla_backend_optimization_level=0"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ["pretrain", "sft", "rm", "ppo", "dpo", "grpo"]
# Iterations per run: enough for 10 kills and a signal at distinct steps, each stage's steps
# lasting long enough (tens of ms and up) for a kill to land before the run ends.
STEPS = {"pretrain": 120, "sft": 60, "rm": 60, "ppo": 40, "dpo": 60, "grpo": 40}


def prepare(stage, root) -> dict:
  """A stage's data under `root`, shared by every run of it (so runs differ only in their
  faults): token shards for pretraining, a chat JSONL for SFT, preference pairs for the reward
  model and DPO, prompts for PPO and GRPO. Returns {"config": file, dotted field: value}."""
  if stage == "pretrain":
    corpus.build(corpus.DataConfig(vocab_size=512, seq_len=32), str(root), progress=False)
    return {
      "config": "configs/experiments/tiny_test.py",
      "data.corpus": "shards",
      "data.path": str(root / "data"),
    }
  if stage in ("rm", "dpo"):  # DPO's reference logprobs are stored with its pairs
    sum_pairs(root / "pairs.jsonl", all_sum_pairs(seed=0)[:400])
    return {
      "config": f"configs/experiments/{stage}_tiny_test.py",
      "data.path": str(root / "pairs.jsonl"),
    }
  if stage in ("ppo", "grpo"):  # prompts, sampling keys, models, PPO's adaptive beta
    with open(root / "prompts.jsonl", "w") as f:
      for word in reversal_chats(root / "words.jsonl", 64, seed=0):
        f.write(json.dumps({"prompt": word}) + "\n")
    out = {
      "config": f"configs/experiments/{stage}_tiny_test.py",
      "rlhf.prompts": str(root / "prompts.jsonl"),
      "rlhf.reward": "tests.rlhf.test_ppo:letters_reward",
    }
    return {**out, "rlhf.kl_controller": "adaptive"} if stage == "ppo" else out
  reversal_chats(root / "chats.jsonl", 400, seed=0)
  return {"config": "configs/experiments/sft_tiny_test.py", "data.path": str(root / "chats.jsonl")}


def config(prepared: dict, **fields):
  """The ConfigDict a run of `prepared` has in-process, with `fields` (dotted names, "." as
  "__") set too."""
  module = importlib.import_module(prepared["config"].removesuffix(".py").replace("/", "."))
  c = module.get_config()
  values = {k: v for k, v in prepared.items() if k != "config"}
  values.update({k.replace("__", "."): v for k, v in fields.items()})
  c.update_from_flattened_dict(values)
  return c


def run_config(prepared, steps):
  """A run of `prepared` as the kill tests run it: `steps` iterations, every step logged, a
  checkpoint every 3 (the last 2 kept), dropout on, one CPU device."""
  return config(
    prepared,
    train__steps=steps,
    train__log_every=1,
    train__checkpoint_every=3,
    train__keep_checkpoints=2,
    train__progress=False,
    train__tensorboard=False,
    # Dropout as shakespeare_char_10m trains: a resumed run must redraw the same masks.
    model__dropout=0.1,
    model__attention_dropout=0.1,
    model__dropout_prng="hash",
    mesh__devices=1,
  )


class Zygote:
  """tests/faults/zygote.py: starts each run as a process forked from one that has the
  training code imported already (a run's process then starts in about a second, not four)."""

  def __init__(self):
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "tests.faults.zygote"],
      cwd=REPO,
      env=env,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    self.count = 0

  def start(self, stage, prepared, workdir) -> "Run":
    self.count += 1
    log = os.path.join(os.path.dirname(os.path.abspath(workdir)), f"run{self.count}.log")
    return self._fork(
      {"prepared": prepared, "steps": STEPS[stage], "workdir": str(workdir), "log": log}
    )

  def command(self, module: str, argv: list, log: str, env=None, fsize: int = 0) -> "Run":
    """`python -m module argv...` in a forked process, with `env` added to its environment and
    files limited to `fsize` bytes (0: no limit); stdout to `log`, stderr to log + ".err"."""
    argv = [str(a) for a in argv]
    return self._fork(
      {"module": module, "argv": argv, "log": log, "env": env or {}, "fsize": fsize}
    )

  def _fork(self, request) -> "Run":
    for stale in (request["log"] + ".rc", request["log"] + ".err"):  # of an earlier run
      if os.path.exists(stale):
        os.remove(stale)
    self.proc.stdin.write(json.dumps(request) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    assert line.strip().isdigit(), f"the zygote did not start it: {line!r}"
    return Run(int(line), request["log"])

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


class Run:
  """One run's process: its pid, its output, its exit code once it has ended."""

  def __init__(self, pid, log):
    self.pid, self.log = pid, log

  def poll(self) -> int | None:
    if not os.path.exists(self.log + ".rc"):
      return None
    with open(self.log + ".rc") as f:
      return int(f.read())

  def output(self) -> str:
    with open(self.log) as f:
      return f.read()

  def send_signal(self, sig):
    os.kill(self.pid, sig)

  def kill(self):
    self.send_signal(signal.SIGKILL)
    return self.wait()

  def wait(self, timeout=240) -> int:
    t0 = time.time()
    while (code := self.poll()) is None:
      assert time.time() - t0 < timeout, f"run {self.pid} did not end:\n{self.output()[-2000:]}"
      time.sleep(0.02)
    return code


def finish(run, timeout=240):
  code = run.wait(timeout)
  assert code == 0, run.output()[-3000:]
  return run.output()


def rows(workdir) -> list[dict]:
  """The training rows logged so far (a line being written is left for the next read)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      if line.endswith("\n"):
        row = json.loads(line)
        if row["split"] == "train":
          out.append(row)
  return out


def losses_by_step(workdir):
  """The last logged losses of each step, and PPO's KL coefficient (a resumed run re-logs
  the steps it redid): every model's loss when a stage trains several."""
  return {
    r["step"]: tuple(sorted((k, v) for k, v in r.items() if k.endswith("loss") or k == "beta"))
    for r in rows(workdir)
  }


def final_params(workdir, steps):
  """Every model's parameters (PPO: the policy's and the critic's)."""
  states = ocp.StandardCheckpointer().restore(
    os.path.join(workdir, "checkpoints", str(steps), "states")
  )
  return {name: state["params"] for name, state in states.items()}


def wait_for(predicate, run, timeout=180):
  t0 = time.time()
  while not predicate():
    if run.poll() is not None:
      raise AssertionError(f"the run ended before it could be interrupted:\n{run.output()[-2000:]}")
    assert time.time() - t0 < timeout, "timed out waiting for the run"
    time.sleep(0.02)


def assert_same_run(workdir, reference):
  """Every step's losses and the final parameters bitwise the uninterrupted run's."""
  import jax

  want_losses, want_params = reference
  got = losses_by_step(workdir)
  steps = max(want_losses)
  assert sorted(got) == sorted(want_losses) == list(range(1, steps + 1))
  diff = [s for s in got if got[s] != want_losses[s]]
  assert not diff, f"losses differ at steps {diff[:5]}: resume is not exact"
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir, steps), want_params)


def updates_per_iteration(stage, c) -> int:
  """Optimizer steps of each model per loop iteration."""
  if stage == "ppo":
    return c.rlhf.epochs * c.rlhf.minibatches
  if stage == "grpo":
    return c.rlhf.iterations * c.rlhf.minibatches
  return 1


def short(prepared, steps, **fields):
  """An in-process config of `prepared`: `steps` iterations of an 8-iteration schedule (so
  runs of different lengths resume one another), a checkpoint every 2 (3 kept), every step
  logged, one device."""
  defaults = dict(
    opt__total_steps=8,
    train__checkpoint_every=2,
    train__keep_checkpoints=3,
    train__log_every=1,
    train__eval_every=0,
    train__progress=False,
    train__tensorboard=False,
    mesh__devices=1,  # as the processes run; tiny models step faster on one device
  )
  return config(prepared, train__steps=steps, **{**defaults, **fields})
