"""train.init_from: a stage starts from a Hugging Face folder or one of our workdirs, loaded
into its shardings; a scalar-head model takes an LM's trunk and a fresh head."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from data.prepare import prepare
from data.tokenizer import CharTokenizer
from train import optim
from train import stage as stagelib
from train.metrics import read_metrics

TEXT = "thou art more lovely and more temperate; rough winds do shake the darling buds of may. "


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Character shards of one long document each, so no training row crosses a document."""
  root = tmp_path_factory.mktemp("shards")
  tok = CharTokenizer.from_text(TEXT)
  prepare([TEXT * 40], tok, root / "train", progress=False)
  prepare([TEXT * 10], tok, root / "val", progress=False)
  return str(root)


def config(shards, init_from="", layout="dp", steps=1):
  from configs.experiments import tiny_test

  c = tiny_test.get_config()
  c.data.corpus, c.data.path = "shards", shards
  c.train.steps, c.train.checkpoint_every = steps, steps
  c.train.sample_tokens = 4
  c.mesh.layout = layout
  if init_from:
    c.train.init_from = init_from
    c.model = ml_collections.ConfigDict({"dropout": 0.0})  # the weights give the architecture
  return c


def first_step_loss(c, workdir):
  from train import loop

  loop.train(c, workdir)
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return next(r["loss"] for r in rows if r["split"] == "train" and r["step"] == 1)


def first_batch(c, workdir):
  """The batch the run's first step trains on (the same seed, the same iterator)."""
  stage = stagelib.build_stage(c, workdir)
  batch = next(stage._iterator())
  stage.close()
  return batch


@pytest.mark.parametrize("layout", ["dp", "fsdp"])
def test_init_from_a_hugging_face_folder_gives_transformers_loss(hf_dirs, shards, tmp_path, layout):
  """The first step's loss (before its update) is transformers' cross entropy on the same
  batch, fp32 within 1e-4; under FSDP over 8 devices as on one."""
  import torch

  hf_model, folder = hf_dirs["llama"]
  c = config(shards, init_from=folder, layout=layout)
  batch = first_batch(c, str(tmp_path / "peek"))
  with torch.no_grad():
    logits = hf_model(
      torch.as_tensor(batch["inputs"], dtype=torch.long),
      position_ids=torch.as_tensor(batch["positions"], dtype=torch.long),
    ).logits
    nll = torch.nn.functional.cross_entropy(
      logits.transpose(1, 2), torch.as_tensor(batch["targets"], dtype=torch.long), reduction="none"
    ).numpy()
  assert (batch["segment_ids"] == 1).all(), "a row crossing documents would differ from HF"
  want = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  got = first_step_loss(c, str(tmp_path / "run"))
  np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
  """One of our runs: 6 steps of tiny_test, so its weights are not an init."""
  from train import loop

  workdir = str(tmp_path_factory.mktemp("source"))
  loop.train(config(shards, steps=6), workdir)
  return workdir


@pytest.mark.parametrize("layout", ["dp", "fsdp"])
def test_init_from_a_workdir_gives_that_runs_loss(trained, shards, tmp_path, layout):
  """The first step's loss equals the source run's evaluation of its own final weights on
  the same batch (its eval step, one device); under FSDP(8) too."""
  from train.weights import load_for_inference

  c = config(shards, init_from=trained, layout=layout)
  batch = first_batch(c, str(tmp_path / "peek"))
  source_stage = stagelib.build_stage(config(shards), str(tmp_path / "source_stage"))
  _, _, params, _ = load_for_inference(trained)
  out = jax.device_get(source_stage.eval_step(params, source_stage.mesh.shard(batch)))
  want = out["loss_sum"] / out["count"]
  got = first_step_loss(c, str(tmp_path / "run"))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Our own weights, reread: the summary's workdir ran from them, not from an init.
  assert json.load(open(tmp_path / "run" / "summary.json"))["start_step"] == 0


@pytest.mark.parametrize("layout", ["dp", "fsdp"])
@pytest.mark.parametrize("head_init", ["reward", "zero"])
def test_scalar_model_from_an_lm_has_its_trunk_bitwise_and_a_fresh_head(trained, layout, head_init):
  """A reward or value model started from an LM: every trunk parameter equals the LM's
  bitwise, the LM head is not carried, and the head is new: N(0, 1/sqrt(d+1)) with bias 0
  for a reward model, zeros for a value model."""
  from configs import base
  from train import weights

  source = weights.resolve(trained)
  c = base.get_config()
  c.mesh.layout = layout
  mesh = stagelib.make_mesh(c)
  model = stagelib.build_model(
    "scalar", source.model_cfg, optim.OptimConfig(), mesh, 0, source, head_init
  )
  _, _, lm, _ = weights.load_for_inference(trained)
  params = jax.device_get(model.state.params)
  assert set(params) == {"trunk", "head"}
  want_trunk = {k: v for k, v in jax.device_get(lm).items() if k != "lm_head"}
  jax.tree.map(np.testing.assert_array_equal, params["trunk"], want_trunk)
  kernel, bias = params["head"]["kernel"], params["head"]["bias"]
  np.testing.assert_array_equal(bias, 0.0)
  d = source.model_cfg.d_model
  if head_init == "zero":
    np.testing.assert_array_equal(kernel, 0.0)
  else:
    assert 0.7 < kernel.std() * np.sqrt(d + 1) < 1.3, kernel.std()
  if layout == "fsdp":
    emb = model.state.params["trunk"]["embed"]["table_VxD"]
    assert len(emb.sharding.device_set) == 8


def test_another_architecture_than_the_weights_is_named(trained, shards, tmp_path):
  c = config(shards, init_from=trained)
  c.model = ml_collections.ConfigDict({"n_layers": 5, "dropout": 0.1})
  with pytest.raises(
    ValueError, match=r"config.model asks for another model .*'n_layers': \(5, 2\)"
  ):
    stagelib.build_stage(c, str(tmp_path))
  c.train.init_from = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"train.init_from=.*nowhere. is neither one of our"):
    stagelib.build_stage(c, str(tmp_path))
