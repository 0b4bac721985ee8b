"""kill -9 at random steps of one run (10 with FAULT_KILLS=10), each time resumed from the latest checkpoint, then a
preemption signal, then the rest of the run: every step's losses and the final parameters are
bitwise those of an uninterrupted run (CPU, dropout on), for pretraining, SFT, the reward
model, PPO, DPO and GRPO, each through the one loop."""

import os
import random
import signal
import time

import pytest

from tests.faults import runs

# Kills per run: the 10 with FAULT_KILLS=10 (docs/reliability.md has that run); make
# test kills each stage's run once, then signals it, to stay within its time.
KILLS = int(os.environ.get("FAULT_KILLS", "1"))
# A signal's checkpoint comes within one iteration and one save of it; on these tiny runs that
# is well under a second (SIGNAL_SECONDS leaves room for a loaded machine).
SIGNAL_SECONDS = 20.0


@pytest.fixture(scope="module")
def reference(zygote, stage, prepared, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  runs.finish(zygote.start(stage, prepared, workdir))
  return runs.losses_by_step(workdir), runs.final_params(workdir, runs.STEPS[stage])


def run_until(zygote, stage, prepared, workdir, target):
  """Starts a run and waits until it logs step `target` or later (rows logged by this
  process: a killed run's last rows are redone)."""
  before = len(runs.rows(workdir))
  run = zygote.start(stage, prepared, workdir)
  runs.wait_for(lambda: any(r["step"] >= target for r in runs.rows(workdir)[before:]), run)
  return run


def test_kill_9_at_random_steps_then_a_signal_resume_exactly(
  zygote, stage, prepared, reference, tmp_path
):
  """Each kill lands at (or just after) a step drawn at random, mid-step or mid-save; the next
  run resumes from the latest checkpoint and redoes the steps after it. After every kill the
  losses logged so far equal the uninterrupted run's, so a failure names the kill.

  Then SIGTERM (SIGINT for pretraining: Ctrl-C takes the same path) must save the step it
  stopped at and exit within SIGNAL_SECONDS. Checked to fail once with each protection patched
  out: with the stage's host state (data position, sampling keys, KL coefficient) not
  restored, the losses of a resumed run differed; without train/checkpoint.py:StopSignal
  the signal killed the run with no checkpoint."""
  workdir = str(tmp_path / "run")
  want_losses, _ = reference
  steps = runs.STEPS[stage]
  kills = sorted(random.Random(stage).sample(range(2, int(0.75 * steps)), KILLS))
  for target in kills:
    assert run_until(zygote, stage, prepared, workdir, target).kill() == -signal.SIGKILL
    got = runs.losses_by_step(workdir)
    wrong = [s for s in sorted(got) if got[s] != want_losses[s]]
    assert not wrong, f"after a kill at step {target}: losses differ at steps {wrong[:5]}"

  sig = signal.SIGINT if stage == "pretrain" else signal.SIGTERM
  last = max(runs.losses_by_step(workdir))
  run = run_until(zygote, stage, prepared, workdir, last + 2)
  t0 = time.perf_counter()
  run.send_signal(sig)
  out = runs.finish(run)
  seconds = time.perf_counter() - t0
  assert "received signal" in out, out[-2000:]
  stopped = max(runs.losses_by_step(workdir))
  assert stopped < steps, "the signal arrived after the run had finished"
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped))), (
    f"{sig.name} must checkpoint the step it stopped at"
  )
  assert seconds < SIGNAL_SECONDS, f"{sig.name} took {seconds:.1f} s to save and exit"

  out = runs.finish(zygote.start(stage, prepared, workdir))
  assert f"resumed from step {stopped}" in out
  runs.assert_same_run(workdir, reference)
