"""The train step: overfitting, gradient accumulation, optimizer details, checkpoint restore
onto another layout."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from model.config import preset
from model.transformer import Transformer
from train import checkpoint as ckpt
from train import losses, optim, partitioning
from train import step as steplib
from tests.conftest import assert_trees_close

CFG = preset("tiny", vocab_size=64, max_seq_len=16)


def make_batch(b, l=16, seed=0, vocab=64):
  rng = np.random.default_rng(seed)
  toks = rng.integers(1, vocab, size=(b, l + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "segment_ids": np.ones((b, l), np.int32),
          "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1)),
          "loss_mask": np.ones((b, l), np.float32)}


def setup(layout="dp", devices=None, opt_cfg=None, grad_accum=1, cfg=CFG, **mesh_sizes):
  layout = partitioning.load_layout(layout, mesh_sizes)
  mesh = partitioning.make_mesh(layout, devices)
  opt_cfg = opt_cfg or optim.OptimConfig(lr=1e-2, warmup_steps=0, total_steps=100,
                                         schedule="constant", grad_accum=grad_accum)
  graphdef, state, shardings, optimizer = steplib.init_sharded(
      lambda: Transformer(cfg, rngs=nnx.Rngs(0)), opt_cfg, mesh, layout.rules, seed=0)
  batch_sh = {k: partitioning.batch_sharding(mesh, layout.rules) for k in make_batch(1)}
  step = steplib.jit_train_step(shardings, batch_sh, graphdef=graphdef, loss_fn=losses.lm_loss,
                                optimizer=optimizer, lr_schedule=optim.schedule(opt_cfg),
                                grad_accum=opt_cfg.grad_accum, mesh=mesh, rules=layout.rules)
  put = lambda b: partitioning.shard_batch(b, mesh, layout.rules)
  return state, step, put, shardings


def test_tiny_model_overfits_one_batch():
  state, step, put, _ = setup(devices=jax.devices()[:1])
  batch = put(make_batch(4))
  first = None
  for _ in range(150):
    state, m = step(state, batch)
    first = float(m["loss"]) if first is None else first
  assert first > 3.5, "a fresh model should be near log(64) = 4.16"
  assert float(m["loss"]) < 0.05, f"could not overfit one batch: loss {float(m['loss'])}"


def test_gradient_accumulation_equals_one_big_batch():
  """4 microbatches of 2 rows vs one batch of 8: the same summed loss, count and gradient
  (fp32 tolerance), and the same losses over several AdamW steps.

  Parameters after AdamW steps are not compared element-wise: Adam divides by sqrt(v), which
  turns fp32 rounding in near-zero gradients into visible differences by design."""
  big = make_batch(8, seed=1)
  state, _, put, _ = setup(devices=jax.devices()[:1])
  graphdef = nnx.graphdef(Transformer(CFG, rngs=nnx.Rngs(0)))
  rng = jax.random.PRNGKey(0)
  one = steplib.compute_grads(graphdef, losses.lm_loss, state.params, put(big), rng, 1)
  four = steplib.compute_grads(graphdef, losses.lm_loss, state.params, put(big), rng, 4)
  np.testing.assert_allclose(four[0], one[0], rtol=1e-6)
  assert float(four[1]) == float(one[1]) == 8 * 16
  assert_trees_close(four[3], one[3])  # entries are sums over 128 tokens

  s1, step1, put1, _ = setup(devices=jax.devices()[:1])
  s4, step4, put4, _ = setup(devices=jax.devices()[:1], grad_accum=4)
  for i in range(3):
    s1, m1 = step1(s1, put1(make_batch(8, seed=20 + i)))
    s4, m4 = step4(s4, put4(make_batch(8, seed=20 + i)))
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)


def test_accumulated_loss_weights_tokens_not_microbatches():
  """With uneven loss masks, the mean is over all tokens (sums and counts), not a mean of
  microbatch means."""
  big = make_batch(8, seed=2)
  big["loss_mask"][::2, 8:] = 0.0  # rows 0, 2, 4, 6 count half their tokens
  s1, step1, put1, _ = setup(devices=jax.devices()[:1])
  s2, step2, put2, _ = setup(devices=jax.devices()[:1], grad_accum=2)
  _, m1 = step1(s1, put1(big))
  _, m2 = step2(s2, put2(big))
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  assert float(m1["tokens"]) == 8 * 16 - 4 * 8
  # The gradients too: a mean per microbatch (32 and 64 tokens) would weight them unevenly.
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)


def log_softmax64(logits):
  shifted = np.asarray(logits, np.float64)
  shifted = shifted - shifted.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.fixture
def jit_calls(monkeypatch):
  """Every jax.jit call made while the test runs."""
  calls = []
  real_jit = jax.jit
  monkeypatch.setattr(jax, "jit", lambda *a, **k: calls.append(a) or real_jit(*a, **k))
  return calls


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  loss_sum, count, _ = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                            jnp.asarray(weights), z_loss=1e-2)
  logp = log_softmax64(logits)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  logz = logits[..., 0] - logp[..., 0]  # log-sum-exp: any logit minus its log-probability
  np.testing.assert_allclose(loss_sum, ((nll + 1e-2 * logz ** 2) * weights).sum(), rtol=1e-5)
  assert float(count) == weights.sum()


def test_masked_positions_cannot_poison_the_loss():
  """Padding rows may hold NaN or inf logits; with weight 0 they add nothing, not NaN."""
  logits = np.zeros((1, 3, 4), np.float32)
  logits[0, 2] = np.nan
  loss_sum, count, m = losses.cross_entropy(jnp.asarray(logits), jnp.zeros((1, 3), jnp.int32),
                                            jnp.array([[1.0, 1.0, 0.0]]))
  np.testing.assert_allclose(loss_sum, 2 * np.log(4), rtol=1e-6)
  assert float(count) == 2 and np.isfinite(float(m["accuracy"]))
  grad = jax.grad(lambda x: losses.cross_entropy(x, jnp.zeros((1, 3), jnp.int32),
                                                 jnp.array([[1.0, 1.0, 0.0]]))[0])(
      jnp.asarray(logits))
  assert np.all(np.isfinite(grad)), "a masked NaN must not reach the gradient"
  np.testing.assert_array_equal(grad[0, 2], 0.0)
  np.testing.assert_allclose(grad[0, 0], [-0.75, 0.25, 0.25, 0.25], rtol=1e-6)


def test_schedule_is_nanogpt_formula():
  cfg = optim.OptimConfig(lr=1e-3, final_lr=1e-4, warmup_steps=100, total_steps=2000)
  lr = optim.schedule(cfg)

  def nanogpt(it):  # nanoGPT train.py get_lr
    if it < 100:
      return 1e-3 * (it + 1) / 101
    ratio = (it - 100) / 1900
    return 1e-4 + 0.5 * (1.0 + np.cos(np.pi * ratio)) * (1e-3 - 1e-4)

  for it in (0, 1, 50, 99, 100, 101, 1000, 1999, 2000):
    np.testing.assert_allclose(float(lr(it)), nanogpt(it), rtol=1e-5)


def test_weight_decay_mask():
  params = nnx.to_pure_dict(nnx.state(Transformer(preset("tiny_gpt2"), rngs=nnx.Rngs(0))))
  mask = optim.decay_mask(params, decay_embeddings=False)
  assert mask["blocks"][0]["attn"]["q"]["kernel"] is True
  assert mask["blocks"][0]["attn"]["q"]["bias"] is False
  assert mask["blocks"][0]["attn_norm"]["scale"] is False
  assert mask["embed"]["table_VxD"] is False and mask["pos_embed_SxD"] is False
  assert optim.decay_mask(params, decay_embeddings=True)["embed"]["table_VxD"] is True


def test_checkpoint_from_one_device_restores_onto_fsdp8(tmp_path):
  """Train 3 steps on 1 device, save; restore onto 8 devices under FSDP: the next loss
  matches the 1-device run's next loss."""
  batches = [make_batch(8, seed=10 + i) for i in range(4)]
  state, step, put, _ = setup(devices=jax.devices()[:1])
  for b in batches[:3]:
    state, _ = step(state, put(b))
  saver = ckpt.Checkpointer(str(tmp_path / "ck"), async_save=False)
  saver.save(3, state, {"grain": 3, "config": {}}, {"note": "test"})
  saver.close()
  _, want = step(state, put(batches[3]))

  fresh, step8, put8, shardings8 = setup("fsdp")
  restored, data_state = ckpt.Checkpointer(str(tmp_path / "ck")).restore(
      3, ckpt.abstract_like(fresh, shardings8))
  assert data_state["grain"] == 3
  kernel = restored.params["blocks"][0]["mlp"]["up"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  assert kernel.addressable_shards[0].data.shape == (64 // 8, 128)
  mu = restored.opt_state[1][0].mu["blocks"][0]["mlp"]["up"]["kernel"]
  assert mu.addressable_shards[0].data.shape == (64 // 8, 128), "moments follow their params"
  assert int(restored.step) == 3
  _, got = step8(restored, put8(batches[3]))
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
def test_inference_load_of_an_fsdp8_checkpoint_lands_on_one_device(tmp_path, monkeypatch, scan):
  """model.sample reads checkpoints saved under any layout onto one device, from a workdir
  given relative to the current directory (as the demo prints it), with the tokenizer the
  checkpoint carries: the run's tokenizer directory is not needed."""
  import dataclasses

  from data.tokenizer import CharTokenizer, tokenizer_to_json
  model_cfg = dataclasses.replace(CFG, scan_layers=scan)
  state, step, put, _ = setup("fsdp", cfg=model_cfg)
  assert len(state.params["embed"]["table_VxD"].sharding.device_set) == 8
  tok = CharTokenizer(sorted(set("ROMEO: thou art")))
  saver = ckpt.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  saver.save(1, state, None, {"model": dataclasses.asdict(model_cfg),
                              "data": {"add_bos": False}}, tokenizer_to_json(tok))
  saver.close()
  assert not (tmp_path / "tokenizer").exists()
  monkeypatch.chdir(tmp_path.parent)
  cfg, data_cfg, params, got_tok = ckpt.load_for_inference(tmp_path.name)
  assert cfg == model_cfg and data_cfg == {"add_bos": False}
  assert got_tok.chars == tok.chars and got_tok.vocab_size == tok.vocab_size
  assert jax.tree.structure(params) == jax.tree.structure(state.params)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
    assert got.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(got, np.asarray(want))


def test_inference_load_names_parameters_the_checkpoint_lacks(tmp_path):
  """A checkpoint whose config builds another tree (here one more layer) is an error that
  names the parameters, not placeholders in place of weights."""
  import dataclasses

  state, *_ = setup("dp")
  saver = ckpt.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  saver.save(1, state, None, {"model": dataclasses.asdict(
      dataclasses.replace(CFG, n_layers=CFG.n_layers + 1))}, {"kind": "char", "chars": ["a"]})
  saver.close()
  with pytest.raises(ValueError, match=rf"missing from the checkpoint: \['blocks/{CFG.n_layers}/"):
    ckpt.load_for_inference(str(tmp_path))


def test_inference_load_falls_back_to_the_workdir_tokenizer(tmp_path):
  """A checkpoint saved without a tokenizer (as earlier runs wrote them) takes the run's."""
  import dataclasses

  from data.tokenizer import CharTokenizer
  state, *_ = setup("dp")
  saver = ckpt.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  saver.save(1, state, None, {"model": dataclasses.asdict(CFG)})
  saver.close()
  CharTokenizer(sorted(set("JULIET"))).save(tmp_path / "tokenizer")
  *_, tok = ckpt.load_for_inference(str(tmp_path))
  assert tok.chars == sorted(set("JULIET"))


def test_query_blocks_must_divide_the_training_length(tmp_path):
  """Checked before any data is prepared: blocks that do not divide seq_len would silently
  run unblocked."""
  from configs.experiments import tiny_test
  from train import loop

  config = tiny_test.get_config()
  config.model.attention_query_blocks = 3  # seq_len is 32
  with pytest.raises(ValueError, match=r"model.attention_query_blocks=3 must divide "
                                       r"data.seq_len=32"):
    loop.build(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_flat_grad_reduce_on_a_sharded_layout_fails_before_compiling(tmp_path, jit_calls):
  """`--config.mesh.grad_reduce=flat` with the fsdp layout: refused by `loop.build` when the
  shardings are known, before the init or the step is jitted."""
  from configs.experiments import tiny_test
  from train import loop

  config = tiny_test.get_config()
  config.mesh.layout = "fsdp"
  config.mesh.grad_reduce = "flat"
  with pytest.raises(partitioning.PartitionError, match=r"mesh.grad_reduce='flat' needs "
                                                         r"replicated parameters"):
    loop.build(config, str(tmp_path))
  assert not jit_calls


def char_shards_config(tmp_path):
  """tiny_test on a few character-level documents prepared under tmp_path (no tokenizer
  training): 2 in the train split, 4 in the validation split, 17 rows of 33."""
  from configs.experiments import tiny_test
  from data.prepare import prepare
  from data.tokenizer import CharTokenizer

  docs = [f"{name}: " + "thou art more lovely and more temperate " * (k + 1)
          for k, name in enumerate(["ROMEO", "JULIET", "NURSE", "MERCUTIO", "TYBALT"])]
  docs.append("PARIS: amen, amen")
  tok = CharTokenizer.from_text("".join(docs))
  prepare(docs[:2], tok, tmp_path / "data" / "train", progress=False)
  prepare(docs[2:], tok, tmp_path / "data" / "val", progress=False)
  config = tiny_test.get_config()
  config.data.corpus, config.data.path = "shards", str(tmp_path / "data")
  return config


@pytest.mark.parametrize("overrides,message", [
    ({"train.eval_evry": 5}, r"config\.train has unknown fields \['eval_evry'\]"),
    ({"data.batchsize": 8}, r"config\.data has unknown fields \['batchsize'\]"),
    ({"data.corpus": "wiki"}, r"data\.corpus='wiki' is unknown; choose one of"),
    ({"data.seq_len": 0}, r"data\.seq_len must be > 0, got 0"),
    ({"model.vocab_size": 10}, r"model\.vocab_size=10 is smaller than the tokenizer's \d+; "
                               r"set it to 0"),
    ({"model.position": "learned", "model.max_seq_len": 16},
     r"data\.seq_len=32 exceeds model\.max_seq_len=16"),
    ({"model.position": "learned", "model.max_seq_len": 16, "data.seq_len": 16,
      "train.sample_prompt": "ROMEO: " * 3},
     r"train\.sample_prompt is 22 tokens; with learned positions it must leave room"),
])
def test_bad_config_values_are_named_before_anything_compiles(tmp_path, jit_calls, overrides,
                                                              message):
  from train import loop

  config = char_shards_config(tmp_path)
  for field, value in overrides.items():
    section, name = field.split(".")
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    loop.build(config, str(tmp_path / "run"))
  assert not jit_calls


def test_evaluate_matches_scoring_each_document_piece_alone(tmp_path):
  """loop.evaluate over a split of several documents, its last batch padded: the loss it
  reports is the mean next-token NLL (without the z-loss the step trains on), against scoring
  every row's document pieces alone, each run through the model as its own sequence, with a
  float64 NumPy log-softmax. What is checked is evaluate's rows, segments, padding and sums."""
  from data.prepare import TokenShards
  from train import loop

  config = char_shards_config(tmp_path)
  config.train.z_loss = 1e-2
  run = loop.build(config, str(tmp_path / "run"))
  # Spread the logits (init std 0.02 leaves them near uniform) so argmax has no near ties.
  params = jax.tree.map(lambda x: 4 * x, run.state.params)
  got = loop.evaluate(run, params)

  shards = TokenShards(run.val_dir)
  stream, starts = shards.read(0, shards.num_tokens), set(shards.doc_starts.tolist())
  row_len = run.data_cfg.seq_len + 1
  n_rows = -(-len(stream) // row_len)
  assert n_rows % run.data_cfg.eval_batch_size, "the last batch should be padded"
  model = nnx.merge(run.graphdef, jax.device_get(params))
  nll = correct = count = 0.0
  for r in range(n_rows):
    lo, hi = r * row_len, min((r + 1) * row_len, len(stream))
    cuts = sorted({lo, hi} | {s for s in starts if lo < s < hi})
    for a, b in zip(cuts, cuts[1:]):
      piece = stream[a:b].astype(np.int32)
      if len(piece) < 2:
        continue
      logits = np.asarray(model(jnp.asarray(piece[None, :-1])))[0]
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
  counted an evaluation (or a checkpoint) would read below a third of that. Steps are
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
  real_loss, real_evaluate = losses.lm_loss, loop.evaluate

  def slow_loss(model, batch, rng, **kw):
    loss_sum, count, m = real_loss(model, batch, rng, **kw)
    slept = jax.pure_callback(lambda x: (time.sleep(STEP_S), x)[1],
                              jax.ShapeDtypeStruct((), jnp.float32),
                              jax.lax.stop_gradient(loss_sum))
    return loss_sum + 0.0 * slept, count, m

  def slow_evaluate(*args, **kw):
    time.sleep(PAUSE_S)
    return real_evaluate(*args, **kw)

  monkeypatch.setattr(losses, "lm_loss", slow_loss)
  monkeypatch.setattr(loop, "evaluate", slow_evaluate)
  config = char_shards_config(tmp_path)
  tok = load_tokenizer(tmp_path / "data" / "train" / "tokenizer")
  shutil.rmtree(tmp_path / "data" / "train")  # 2 rows: too few for batches of 8
  prepare(["ROMEO: thou art more lovely and more temperate " * 12] * 8, tok,
          tmp_path / "data" / "train", progress=False)
  config.train.steps, config.train.log_every = 16, 2
  config.train.eval_every, config.train.checkpoint_every = 4, 6
  config.train.eval_batches = 1
  config.train.peak_flops = 1e9  # one device's
  workdir = str(tmp_path / "run")
  summary = loop.train(config, workdir)

  tokens_per_step = config.data.batch_size * config.data.seq_len
  ceiling = tokens_per_step / STEP_S
  rows = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if r["split"] == "train"]
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
  *_, carried = ckpt.load_for_inference(workdir)
  assert carried.chars == tok.chars
