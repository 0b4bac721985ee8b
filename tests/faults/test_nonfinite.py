"""A NaN or Inf in the loss or the gradients: the run stops naming the step and keeps its last
good checkpoint (train.nonfinite=stop), or skips the step (skip), for pretraining and every
post-training stage, in-process. The fault is injected into the one train step every stage
runs (train/step.py), at one optimizer step of every model."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.faults import runs
from train import loop
from train import step as steplib

BAD_ITERATION = 5


@jax.custom_vjp
def inf_gradient(x, bad):
  """x, whose gradient is infinite where `bad`."""
  return x


inf_gradient.defvjp(
  lambda x, bad: (x, bad), lambda bad, g: (jnp.where(bad, jnp.inf, 1.0) * g, None)
)


def poison(monkeypatch, at_update: int, where: str):
  """The loss (where="loss": NaN) or its gradient (where="gradient": Inf, the loss finite)
  of every model's optimizer step number `at_update` (0-based)."""
  original = steplib.train_step

  def train_step(state, batch, *, loss_fn, **kwargs):
    bad = state.step == at_update

    def loss(model, b, rng):
      loss_sum, count, metrics = loss_fn(model, b, rng)
      if where == "loss":
        return loss_sum * jnp.where(bad, jnp.nan, 1.0), count, metrics  # NaN gradients too
      return inf_gradient(loss_sum, bad), count, metrics

    return original(state, batch, loss_fn=loss, **kwargs)

  monkeypatch.setattr(steplib, "train_step", train_step)


def saved_states(workdir, step):
  return ocp.StandardCheckpointer().restore(
    os.path.join(workdir, "checkpoints", str(step), "states")
  )


@pytest.mark.parametrize(
  "stage,where", [(s, "loss") for s in runs.STAGES] + [("pretrain", "gradient")]
)
def test_a_nonfinite_step_stops_the_run_naming_it(stage, where, tmp_path, monkeypatch):
  """The error names iteration 5 and the last checkpoint, 4, which holds finite parameters;
  nothing after it is saved. Checked to fail once with the protection patched out: without
  the loop's check the run did not stop."""
  prepared = runs.prepare(stage, tmp_path)
  c = runs.short(prepared, 6)
  poison(monkeypatch, runs.updates_per_iteration(stage, c) * (BAD_ITERATION - 1), where)
  workdir = str(tmp_path / "run")
  with pytest.raises(loop.NonFiniteError) as e:
    loop.train(c, workdir)
  msg = str(e.value)
  assert msg.startswith(f"step {BAD_ITERATION}: ") and "last checkpoint, step 4" in msg
  assert ("loss nan" in msg) == (where == "loss") and "train.nonfinite=skip" in msg
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  for state in saved_states(workdir, 4).values():
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.parametrize("stage", ["pretrain"])
def test_a_skipped_step_leaves_every_model_as_it_was(stage, tmp_path, monkeypatch):
  """Under skip the run goes on: iteration 5 is logged as non-finite and is the only one;
  the parameters and optimizer state after it are bitwise those before it (checkpoints 4 and
  5), and the run ends finite. Checked to fail once with the protection patched out: without
  the select in train/step.py the parameters after step 5 were NaN."""
  prepared = runs.prepare(stage, tmp_path)
  c = runs.short(
    prepared, 6, train__nonfinite="skip", train__checkpoint_every=1, train__keep_checkpoints=6
  )
  per = runs.updates_per_iteration(stage, c)
  # The iteration's last update: the ones before it in the iteration do change the models.
  poison(monkeypatch, per * BAD_ITERATION - 1, "loss")
  workdir = str(tmp_path / "run")
  summary = loop.train(c, workdir)
  last = runs.losses_by_step(workdir)[6]
  assert summary["final_step"] == 6 and all(np.isfinite(v) for _, v in last), last
  flagged = {r["step"] for r in runs.rows(workdir) if r.get("nonfinite", r.get("policy/nonfinite"))}
  assert flagged == {BAD_ITERATION}
  # One update per iteration (pretraining): checkpoints 4 and 5 straddle exactly the skip.
  assert per == 1
  before, after = saved_states(workdir, 4), saved_states(workdir, 5)
  for name in before:
    jax.tree.map(np.testing.assert_array_equal, after[name]["params"], before[name]["params"])
    jax.tree.map(np.testing.assert_array_equal, after[name]["opt_state"], before[name]["opt_state"])
