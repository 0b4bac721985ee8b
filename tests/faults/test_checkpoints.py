"""A damaged checkpoint, a full disk during a save, and a workdir made by another config, for
pretraining and every post-training stage, in-process (train.loop.train)."""

import glob
import os
import shutil

import numpy as np
import pytest

from tests.faults import runs
from tests.full_disk import full_disk
from train import checkpoint as ckpt
from train import loop


@pytest.fixture(scope="module")
def base(stage, prepared, tmp_path_factory):
  """A run of 6 iterations: checkpoints 2, 4 and 6."""
  workdir = tmp_path_factory.mktemp(f"base_{stage}")
  loop.train(runs.short(prepared, 6), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
  return workdir


def copy(base, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(base, workdir)
  return workdir


def array_file(step_dir):
  """The largest file of a checkpoint's array data."""
  files = glob.glob(os.path.join(step_dir, "states", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def truncate(step_dir):
  path = array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def flip_a_bit(step_dir):
  """One bit in the middle of the array data: orbax reads it back without complaint; only
  the checksums saved with the checkpoint see it."""
  path = array_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


def garble_json(step_dir):
  with open(os.path.join(step_dir, "config", "metadata"), "w") as f:
    f.write('{"model": ')


DAMAGE = {"truncated": truncate, "one_bit_flipped": flip_a_bit, "garbled_json": garble_json}


# Every kind of damage on pretraining; the subtlest on every other stage.
DAMAGED = [("pretrain", d) for d in DAMAGE] + [(s, "one_bit_flipped") for s in runs.STAGES[1:]]


@pytest.mark.parametrize("stage,damage", DAMAGED, indirect=["stage"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
  stage, prepared, base, damage, tmp_path, capsys
):
  """The run warns naming the damaged step and the one it resumes instead, moves the damaged
  one aside, and goes on exactly as the first run did from there (its losses at steps 5 and 6
  are bitwise the first run's). Checked to fail once with the protection patched out: without
  the checksums, the flipped bit was restored silently."""
  workdir = copy(base, tmp_path)
  DAMAGE[damage](workdir / "checkpoints" / "6")
  summary = loop.train(runs.short(prepared, 6), str(workdir))
  out = capsys.readouterr().out
  assert f"checkpoint step 6 in {workdir / 'checkpoints'} cannot be read" in out
  assert "resuming from step 4 instead" in out and summary["start_step"] == 4
  assert os.path.isdir(workdir / "checkpoints" / "unreadable-6")
  first, again = (runs.losses_by_step(str(w)) for w in (base, workdir))
  assert again[5] == first[5] and again[6] == first[6]


@pytest.mark.parametrize("stage", ["pretrain"], indirect=True)
def test_when_no_checkpoint_can_be_read_the_run_refuses_to_start_afresh(
  stage, prepared, base, tmp_path
):
  """Every checkpoint damaged: an error naming each one, and nothing moved or written (the
  loop's choice, the same for every stage)."""
  workdir = copy(base, tmp_path)
  for step in (2, 4, 6):
    flip_a_bit(workdir / "checkpoints" / str(step))
  with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint in .* can be read: step 6: "):
    loop.train(runs.short(prepared, 8), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]


@pytest.mark.parametrize("stage", ["pretrain", "ppo"], indirect=True)
def test_a_full_disk_during_a_save_names_it_and_leaves_earlier_checkpoints(
  stage, prepared, tmp_path, monkeypatch
):
  """The save of step 4 meets a file system that refuses to grow files (the file size limit,
  RLIMIT_FSIZE, as a full disk refuses writes), with one state (pretraining) and two (PPO's
  policy and critic). The run stops with an error naming the step, the cause and the intact
  checkpoints; step 2 restores, and a run resumes from it. Checked to fail once with the
  protection patched out: without Checkpointer._saving, a bare "OSError: [Errno 27] File too
  large" surfaced, naming no step."""
  save = ckpt.Checkpointer.save

  def fill_the_disk_at_4(self, step, states, items):
    if step != 4:
      return save(self, step, states, items)
    self.wait()  # step 2 is written
    with full_disk(4096):
      saved = save(self, step, states, items)
      self.wait()  # the background write meets the limit
      return saved

  monkeypatch.setattr(ckpt.Checkpointer, "save", fill_the_disk_at_4)
  workdir = str(tmp_path / "run")
  with pytest.raises(
    ckpt.CheckpointError,
    match=r"saving checkpoint step 4 in .* failed: .*File too large.*Checkpoints \[2\] are "
    r"intact; free space and run again to resume from step 2",
  ):
    loop.train(runs.short(prepared, 6), workdir)
  monkeypatch.undo()
  assert [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()] == ["2"]
  summary = loop.train(runs.short(prepared, 6), workdir)
  assert summary["start_step"] == 2 and summary["final_step"] == 6


def test_a_workdir_of_another_config_refuses_to_resume_naming_the_fields(
  stage, prepared, base, tmp_path
):
  """Before anything is built: the fields that differ, saved and now, and the way out. What
  any resume may change (steps, logging, the mesh) is accepted, and with
  train.allow_config_change the changed run resumes. Checked to fail once with the protection
  patched out: without the check the run resumed with the new learning rate."""
  workdir = copy(base, tmp_path)
  before = (workdir / "config.json").read_text()
  changed = runs.short(prepared, 8, opt__lr=1e-4, train__seed=7)
  with pytest.raises(ckpt.ConfigMismatch) as e:
    loop.train(changed, str(workdir))
  assert "opt.lr: " in str(e.value) and " -> 0.0001" in str(e.value)
  assert "train.seed: 0 -> 7" in str(e.value) and "allow_config_change=True" in str(e.value)
  assert (workdir / "config.json").read_text() == before, "a refused run writes nothing"
  if stage != "pretrain":
    return
  free = runs.short(prepared, 8, train__log_every=2, train__keep_checkpoints=5)
  assert loop.train(free, str(workdir))["start_step"] == 6
  changed.train.steps = 10
  changed.train.allow_config_change = True
  summary = loop.train(changed, str(workdir))
  assert summary["start_step"] == 8 and np.isfinite(summary["train_loss"])
