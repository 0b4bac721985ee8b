"""Exact resume: a run stopped by SIGTERM (then, resumed, killed with -9 after a checkpoint)
or by SIGINT, and resumed, has bitwise the losses and final parameters of an uninterrupted
run (CPU), dropout included: pretraining, SFT, the reward model, PPO, DPO and GRPO, each
through the one loop."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from data import corpus
from tests.rlhf.test_reward import all_sum_pairs, sum_pairs
from tests.train.test_sft import reversal_chats
from train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 200


@pytest.fixture(scope="module", params=["pretrain", "sft", "rm", "ppo", "dpo", "grpo"])
def prepared(request, tmp_path_factory):
  """A stage's data made once, shared by every run (so runs differ only in interruption):
  token shards for pretraining, a chat JSONL for SFT, preference pairs for the reward model.
  Returns the command-line flags."""
  root = tmp_path_factory.mktemp(f"prepared_{request.param}")
  if request.param == "pretrain":
    corpus.build(corpus.DataConfig(vocab_size=512, seq_len=32), str(root), progress=False)
    return [
      "--config=configs/experiments/tiny_test.py",
      "--config.data.corpus=shards",
      f"--config.data.path={root / 'data'}",
    ]
  if request.param == "rm":
    sum_pairs(root / "pairs.jsonl", all_sum_pairs(seed=0)[:400])
    return [
      "--config=configs/experiments/rm_tiny_test.py",
      f"--config.data.path={root / 'pairs.jsonl'}",
    ]
  if request.param == "dpo":  # the reward model's pairs; reference logprobs stored with them
    sum_pairs(root / "pairs.jsonl", all_sum_pairs(seed=0)[:400])
    return [
      "--config=configs/experiments/dpo_tiny_test.py",
      f"--config.data.path={root / 'pairs.jsonl'}",
    ]
  if request.param in ("ppo", "grpo"):  # prompts, sampling keys, models, PPO's beta
    with open(root / "prompts.jsonl", "w") as f:
      for word in reversal_chats(root / "words.jsonl", 64, seed=0):
        f.write(json.dumps({"prompt": word}) + "\n")
    flags = [
      f"--config=configs/experiments/{request.param}_tiny_test.py",
      f"--config.rlhf.prompts={root / 'prompts.jsonl'}",
      "--config.rlhf.reward=tests.rlhf.test_ppo:letters_reward",
    ]
    return flags + ["--config.rlhf.kl_controller=adaptive"] if request.param == "ppo" else flags
  reversal_chats(root / "chats.jsonl", 400, seed=0)
  return [
    "--config=configs/experiments/sft_tiny_test.py",
    f"--config.data.path={root / 'chats.jsonl'}",
  ]


def steps_of(prepared):
  """Pretraining runs 200 steps; the post-training stages, whose state is more than one
  iterator, as many as a signal after 15 logged steps and a kill after checkpoint 20 need."""
  for name, steps in (
    ("ppo_tiny_test", 40),
    ("grpo_tiny_test", 40),
    ("sft_tiny_test", 60),
    ("rm_tiny_test", 60),
    ("dpo_tiny_test", 60),
  ):
    if f"--config=configs/experiments/{name}.py" in prepared:
      return steps
  return STEPS


def start(workdir, prepared):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  cmd = [
    sys.executable,
    "-m",
    "train.main",
    *prepared,
    f"--workdir={workdir}",
    f"--config.train.steps={steps_of(prepared)}",
    "--config.train.checkpoint_every=10",
    "--config.train.keep_checkpoints=2",
    # Dropout as shakespeare_char_10m trains: a resumed run must redraw the same masks.
    "--config.model.dropout=0.1",
    "--config.model.attention_dropout=0.1",
    "--config.model.dropout_prng=hash",
  ]
  return subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def finish(proc, timeout=240):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]
  return out


def losses_by_step(workdir):
  """The last logged losses of each step, and PPO's KL coefficient (a resumed run re-logs
  the steps it redid): every model's loss when a stage trains several."""
  return {
    r["step"]: tuple(sorted((k, v) for k, v in r.items() if k.endswith("loss") or k == "beta"))
    for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
    if r["split"] == "train"
  }


def final_params(workdir, steps):
  """Every model's parameters (PPO: the policy's and the critic's)."""
  states = ocp.StandardCheckpointer().restore(
    os.path.join(workdir, "checkpoints", str(steps), "states")
  )
  return {name: state["params"] for name, state in states.items()}


def wait_for(predicate, proc, timeout=180):
  t0 = time.time()
  while not predicate():
    assert proc.poll() is None, "the run ended before it could be interrupted"
    assert time.time() - t0 < timeout, "timed out waiting for the run"
    time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  finish(start(workdir, prepared))
  return losses_by_step(workdir), final_params(workdir, steps_of(prepared))


def assert_same_run(workdir, reference):
  want_losses, want_params = reference
  got = losses_by_step(workdir)
  steps = max(want_losses)
  assert sorted(got) == sorted(want_losses) == list(range(1, steps + 1))
  diff = [s for s in got if got[s] != want_losses[s]]
  assert not diff, f"losses differ at steps {diff[:5]}: resume is not exact"
  import jax

  jax.tree.map(np.testing.assert_array_equal, final_params(workdir, steps), want_params)


def test_sigterm_then_kill_9_resume_exactly(prepared, reference, tmp_path):
  """A preemption notice (SIGTERM) saves the step it stopped at, whatever the stage; the
  resumed run, killed with -9 after its next checkpoint, resumes from there and redoes the
  steps after it. Every step's losses and the final parameters are bitwise the uninterrupted
  run's. Losses are compared before the kill too, so a failure names the fault."""
  workdir = str(tmp_path)
  stopped = interrupt(signal.SIGTERM, prepared, workdir)
  after = (stopped // 10 + 1) * 10  # checkpoint_every=10
  proc = start(workdir, prepared)
  wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", str(after))), proc)
  proc.kill()
  out, _ = proc.communicate()
  assert f"resumed from step {stopped}" in out
  want_losses, _ = reference
  got = losses_by_step(workdir)
  wrong = [s for s in range(1, after + 1) if got.get(s) != want_losses[s]]
  assert not wrong, f"after SIGTERM at step {stopped} and resume, losses differ at {wrong[:5]}"
  out = finish(start(workdir, prepared))
  assert "resumed from step" in out
  assert_same_run(workdir, reference)


@pytest.mark.parametrize("prepared", ["pretrain"], indirect=True)
def test_sigint_saves_and_resumes_exactly(prepared, reference, tmp_path):
  """Ctrl-C (SIGINT) goes through the same handler as SIGTERM in every stage; pretraining's
  run shows it saves and resumes too."""
  workdir = str(tmp_path)
  stopped = interrupt(signal.SIGINT, prepared, workdir)
  out = finish(start(workdir, prepared))
  assert f"resumed from step {stopped}" in out
  assert_same_run(workdir, reference)


def interrupt(sig, prepared, workdir) -> int:
  """Runs until 15 steps are logged, sends `sig`, and checks that the run saved the step it
  stopped at; returns that step."""
  proc = start(workdir, prepared)
  metrics = os.path.join(workdir, "metrics.jsonl")
  wait_for(lambda: os.path.exists(metrics) and len(read_metrics(metrics)) >= 15, proc)
  proc.send_signal(sig)
  out = finish(proc)
  assert "received signal" in out, out[-2000:]
  stopped = max(losses_by_step(workdir))
  assert stopped < steps_of(prepared), "the signal arrived after the run had finished"
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped))), (
    f"{signal.Signals(sig).name} must checkpoint the step it stopped at"
  )
  return stopped
