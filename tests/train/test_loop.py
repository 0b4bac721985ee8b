"""The host loop: errors caught before anything compiles, evaluation over a split, and the
logged throughput."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import log_softmax64
from train import losses, partitioning, pretrain
from train.stage import build_stage
from train.weights import load_for_inference


@pytest.fixture
def jit_calls(monkeypatch):
  """Every jax.jit call made while the test runs."""
  calls = []
  real_jit = jax.jit
  monkeypatch.setattr(jax, "jit", lambda *a, **k: calls.append(a) or real_jit(*a, **k))
  return calls


def test_query_blocks_must_divide_the_training_length(tmp_path):
  """Checked before any data is prepared: blocks that do not divide seq_len would silently
  run unblocked."""
  from configs.experiments import tiny_test

  config = tiny_test.get_config()
  config.model.attention_query_blocks = 3  # seq_len is 32
  with pytest.raises(
    ValueError,
    match=r"model.attention_query_blocks=3 must divide "
    r"data.seq_len=32",
  ):
    build_stage(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_flat_grad_reduce_on_a_sharded_layout_fails_before_compiling(tmp_path, jit_calls):
  """`--config.mesh.grad_reduce=flat` with the fsdp layout: refused by `build_stage` when the
  shardings are known, before the init or the step is jitted."""
  from configs.experiments import tiny_test

  config = tiny_test.get_config()
  config.mesh.layout = "fsdp"
  config.mesh.grad_reduce = "flat"
  with pytest.raises(
    partitioning.PartitionError,
    match=r"mesh.grad_reduce='flat' needs "
    r"replicated parameters",
  ):
    build_stage(config, str(tmp_path))
  assert not jit_calls


def char_shards_config(tmp_path):
  """tiny_test on a few character-level documents prepared under tmp_path (no tokenizer
  training): 2 in the train split, 4 in the validation split, 17 rows of 33."""
  from configs.experiments import tiny_test
  from data.prepare import prepare
  from data.tokenizer import CharTokenizer

  docs = [
    f"{name}: " + "thou art more lovely and more temperate " * (k + 1)
    for k, name in enumerate(["ROMEO", "JULIET", "NURSE", "MERCUTIO", "TYBALT"])
  ]
  docs.append("PARIS: amen, amen")
  tok = CharTokenizer.from_text("".join(docs))
  prepare(docs[:2], tok, tmp_path / "data" / "train", progress=False)
  prepare(docs[2:], tok, tmp_path / "data" / "val", progress=False)
  config = tiny_test.get_config()
  config.data.corpus, config.data.path = "shards", str(tmp_path / "data")
  return config


@pytest.mark.parametrize(
  "overrides,message",
  [
    ({"train.eval_evry": 5}, r"config\.train has unknown fields \['eval_evry'\]"),
    ({"data.batchsize": 8}, r"config\.data has unknown fields \['batchsize'\]"),
    ({"data.corpus": "wiki"}, r"data\.corpus='wiki' is unknown; choose one of"),
    ({"data.seq_len": 0}, r"data\.seq_len must be > 0, got 0"),
    (
      {"model.vocab_size": 10},
      r"model\.vocab_size=10 is smaller than the tokenizer's \d+; "
      r"set it to 0",
    ),
    (
      {"model.position": "learned", "model.max_seq_len": 16},
      r"data\.seq_len=32 exceeds model\.max_seq_len=16",
    ),
    (
      {
        "model.position": "learned",
        "model.max_seq_len": 16,
        "data.seq_len": 16,
        "train.sample_prompt": "ROMEO: " * 3,
      },
      r"train\.sample_prompt is 22 tokens; with learned positions it must leave room",
    ),
  ],
)
def test_bad_config_values_are_named_before_anything_compiles(
  tmp_path, jit_calls, overrides, message
):

  config = char_shards_config(tmp_path)
  for field, value in overrides.items():
    section, name = field.split(".")
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    build_stage(config, str(tmp_path / "run"))
  assert not jit_calls


def test_evaluate_matches_scoring_each_document_piece_alone(tmp_path):
  """Pretraining's evaluate over a split of several documents, its last batch padded: the loss it
  reports is the mean next-token NLL (without the z-loss the step trains on), against scoring
  every row's document pieces alone, each run through the model as its own sequence, with a
  float64 NumPy log-softmax. What is checked is evaluate's rows, segments, padding and sums."""
  from data.prepare import TokenShards

  config = char_shards_config(tmp_path)
  config.train.z_loss = 1e-2
  run = build_stage(config, str(tmp_path / "run"))
  # Spread the logits (init std 0.02 leaves them near uniform) so argmax has no near ties.
  params = jax.tree.map(lambda x: 4 * x, run.params)
  got = run.evaluate(params, max_batches=0)  # the whole split

  shards = TokenShards(run.val_dir)
  stream, starts = shards.read(0, shards.num_tokens), set(shards.doc_starts.tolist())
  row_len = run.data_cfg.seq_len + 1
  n_rows = -(-len(stream) // row_len)
  assert n_rows % run.data_cfg.eval_batch_size, "the last batch should be padded"
  model = nnx.merge(run.graphdef, jax.device_get(params))
  # Each piece alone, right-padded to one length so the forward compiles once: causal
  # attention keeps the padding after a piece out of its logits.
  alone = jax.jit(lambda toks: model(toks))
  nll = correct = count = 0.0
  for r in range(n_rows):
    lo, hi = r * row_len, min((r + 1) * row_len, len(stream))
    cuts = sorted({lo, hi} | {s for s in starts if lo < s < hi})
    for a, b in zip(cuts, cuts[1:]):
      piece = stream[a:b].astype(np.int32)
      if len(piece) < 2:
        continue
      padded = np.zeros((1, row_len), np.int32)
      padded[0, : len(piece) - 1] = piece[:-1]
      logits = np.asarray(alone(jnp.asarray(padded)))[0, : len(piece) - 1]
      logp = log_softmax64(logits)
      nll -= logp[np.arange(len(piece) - 1), piece[1:]].sum()
      correct += (logits.argmax(-1) == piece[1:]).sum()
      count += len(piece) - 1
  assert got["tokens"] == count
  np.testing.assert_allclose(got["loss"], nll / count, rtol=1e-5)
  np.testing.assert_allclose(got["perplexity"], np.exp(nll / count), rtol=1e-5)
  np.testing.assert_allclose(got["accuracy"], correct / count, rtol=1e-6)


def test_logged_rate_is_time_spent_stepping(tmp_path, monkeypatch):
  """Every train step is made to take at least STEP_S on the device (a host callback that
  sleeps, inside the step), and every evaluation PAUSE_S more on the host. So no logged
  window, and not the summary, may be faster than tokens_per_step / STEP_S, and a window that
  counted an evaluation would read below a third of that. Steps are
  dispatched asynchronously, so a clock read before waiting on a step would give windows that
  measure dispatch (too fast) and push the wait into the next window. The run's checkpoints
  also carry its tokenizer."""
  import shutil
  import time

  from data.prepare import prepare
  from data.tokenizer import load_tokenizer
  from model.config import ModelConfig
  from train import loop
  from train.metrics import flops_per_token, read_metrics

  STEP_S, PAUSE_S = 0.2, 1.0
  real_loss, real_evaluate = losses.lm_loss, pretrain.Pretrain.evaluate

  def slow_loss(model, batch, rng, **kw):
    loss_sum, count, m = real_loss(model, batch, rng, **kw)
    slept = jax.pure_callback(
      lambda x: (time.sleep(STEP_S), x)[1],
      jax.ShapeDtypeStruct((), jnp.float32),
      jax.lax.stop_gradient(loss_sum),
    )
    return loss_sum + 0.0 * slept, count, m

  def slow_evaluate(*args, **kw):
    time.sleep(PAUSE_S)
    return real_evaluate(*args, **kw)

  monkeypatch.setattr(losses, "lm_loss", slow_loss)
  monkeypatch.setattr(pretrain.Pretrain, "evaluate", slow_evaluate)
  config = char_shards_config(tmp_path)
  tok = load_tokenizer(tmp_path / "data" / "train" / "tokenizer")
  shutil.rmtree(tmp_path / "data" / "train")  # 2 rows: too few for batches of 8
  prepare(
    ["ROMEO: thou art more lovely and more temperate " * 12] * 8,
    tok,
    tmp_path / "data" / "train",
    progress=False,
  )
  config.train.steps, config.train.log_every = 16, 2
  config.train.eval_every, config.train.checkpoint_every = 4, 6
  config.train.eval_batches = 1
  config.train.peak_flops = 1e9  # one device's
  # Checkpoints written in the loop's time, not by a background thread during the next
  # window's steps: on a loaded machine that overlap alone slowed a window to 0.27x.
  config.train.async_checkpoints = False
  workdir = str(tmp_path / "run")
  summary = loop.train(config, workdir)

  tokens_per_step = config.data.batch_size * config.data.seq_len
  ceiling = tokens_per_step / STEP_S
  rows = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
  assert [r["step"] for r in rows] == [1] + list(range(2, 17, 2))
  rates = {r["step"]: r["tokens_per_s"] for r in rows}
  # A window of n steps lasts at least n * STEP_S, less the moment between one step's end and
  # the host's wait on it returning; 25% of a step covers that on a loaded machine.
  too_fast = {s: round(v / ceiling, 2) for s, v in rates.items() if v > 1.25 * ceiling}
  assert not too_fast, f"windows faster than the device can step (x ceiling): {too_fast}"
  # Step 1 is left out here: a compiled step's first run also sets itself up.
  too_slow = {s: round(v / ceiling, 2) for s, v in rates.items() if v < ceiling / 3 and s > 1}
  assert not too_slow, f"windows that counted evaluation or checkpoints (x ceiling): {too_slow}"
  assert ceiling / 3 < summary["tokens_per_s"] <= 1.25 * ceiling, summary["tokens_per_s"]
  # MFU: model FLOPs per second over every device's peak.
  model_cfg = ModelConfig(**{**config.model, "vocab_size": tok.vocab_size})
  per_token = flops_per_token(model_cfg, summary["params"], config.data.seq_len)
  for r in rows + [summary]:
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / (1e9 * jax.device_count()))
  # The checkpoint decodes on its own.
  shutil.rmtree(os.path.join(workdir, "tokenizer"))
  *_, carried = load_for_inference(workdir)
  assert carried.chars == tok.chars
