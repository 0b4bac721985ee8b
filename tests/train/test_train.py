"""The train step: overfitting, gradient accumulation, optimizer details, checkpoint restore
onto another layout and for inference. The host loop's own tests are in test_loop.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import preset
from model.transformer import Transformer
from tests.conftest import assert_trees_close, log_softmax64
from train import checkpoint as ckpt
from train import losses, optim, partitioning
from train import step as steplib
from train.weights import load_for_inference

CFG = preset("tiny", vocab_size=64, max_seq_len=16)


def make_batch(b, l=16, seed=0, vocab=64):
  rng = np.random.default_rng(seed)
  toks = rng.integers(1, vocab, size=(b, l + 1)).astype(np.int32)
  return {
    "inputs": toks[:, :-1],
    "targets": toks[:, 1:],
    "segment_ids": np.ones((b, l), np.int32),
    "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1)),
    "loss_mask": np.ones((b, l), np.float32),
  }


def setup(layout="dp", devices=None, opt_cfg=None, grad_accum=1, cfg=CFG, **mesh_sizes):
  layout = partitioning.load_layout(layout, mesh_sizes)
  mesh = partitioning.make_mesh(layout, devices)
  opt_cfg = opt_cfg or optim.OptimConfig(
    lr=1e-2, warmup_steps=0, total_steps=100, schedule="constant", grad_accum=grad_accum
  )
  graphdef, state, shardings, optimizer = steplib.init_sharded(
    lambda: Transformer(cfg, rngs=nnx.Rngs(0)), opt_cfg, mesh, layout.rules, seed=0
  )
  batch_sh = {k: partitioning.batch_sharding(mesh, layout.rules) for k in make_batch(1)}
  step = steplib.jit_train_step(
    shardings,
    batch_sh,
    graphdef=graphdef,
    loss_fn=losses.lm_loss,
    optimizer=optimizer,
    lr_schedule=optim.schedule(opt_cfg),
    grad_accum=opt_cfg.grad_accum,
    mesh=mesh,
    rules=layout.rules,
  )
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
  grads = jax.jit(steplib.compute_grads, static_argnums=(0, 1, 5))  # op by op: minutes
  one = grads(graphdef, losses.lm_loss, state.params, put(big), rng, 1)
  four = grads(graphdef, losses.lm_loss, state.params, put(big), rng, 4)
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


def test_metrics_carry_their_own_denominators():
  """A loss may report a metric per sequence, as a (sum, count) pair, next to per-token ones:
  under accumulation over 4 microbatches the step reports sum / count of the pair over the
  whole batch, per-token metrics over the loss's count, and that count under the name the
  stage gives it. References: NumPy over the same batch."""
  big = make_batch(8, seed=4)
  big["loss_mask"][:, 10:] = 0.0
  big["loss_mask"][1::2, 4:] = 0.0  # odd rows count 4 tokens, even rows 10

  def loss_fn(model, batch, rng):
    loss_sum, count, m = losses.lm_loss(model, batch, rng)
    tokens_B = batch["loss_mask"].sum(axis=1)
    long_B = (tokens_B > 5).astype(jnp.float32)
    # Per sequence: the share of rows that are long; per token: the mask itself.
    m["long_rows"] = (long_B.sum(), jnp.float32(batch["loss_mask"].shape[0]))
    m["masked_share"] = batch["loss_mask"].sum()
    return loss_sum, count, m

  layout = partitioning.load_layout("dp", {})
  mesh = partitioning.make_mesh(layout, jax.devices()[:1])
  opt_cfg = optim.OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10, grad_accum=4)
  graphdef, state, shardings, optimizer = steplib.init_sharded(
    lambda: Transformer(CFG, rngs=nnx.Rngs(0)), opt_cfg, mesh, layout.rules, seed=0
  )
  batch_sh = {k: partitioning.batch_sharding(mesh, layout.rules) for k in big}
  step = steplib.jit_train_step(
    shardings,
    batch_sh,
    graphdef=graphdef,
    loss_fn=loss_fn,
    optimizer=optimizer,
    lr_schedule=optim.schedule(opt_cfg),
    grad_accum=4,
    mesh=mesh,
    rules=layout.rules,
    count_name="assistant_tokens",
  )
  _, m = step(state, partitioning.shard_batch(big, mesh, layout.rules))
  tokens = big["loss_mask"].sum()
  assert float(m["assistant_tokens"]) == tokens == 4 * 10 + 4 * 4
  assert "tokens" not in m
  assert float(m["long_rows"]) == 0.5  # 4 of 8 rows, not divided by the token count
  assert float(m["masked_share"]) == 1.0


def test_token_logprobs_at_a_temperature_match_numpy():
  """The one logprob: log softmax(logits / T)[target] for any leading shape; T = 0 (greedy)
  scores at T = 1."""
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 3, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(2, 3))
  for t in (0.7, 1.0, 1.3):
    want = np.take_along_axis(log_softmax64(logits / t), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses.token_logprobs(logits, targets, t), want, rtol=1e-5)
  np.testing.assert_array_equal(
    losses.token_logprobs(logits, targets, 0.0), losses.token_logprobs(logits, targets, 1.0)
  )


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  loss_sum, count, _ = losses.cross_entropy(
    jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), z_loss=1e-2
  )
  logp = log_softmax64(logits)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  logz = logits[..., 0] - logp[..., 0]  # log-sum-exp: any logit minus its log-probability
  np.testing.assert_allclose(loss_sum, ((nll + 1e-2 * logz**2) * weights).sum(), rtol=1e-5)
  assert float(count) == weights.sum()


def test_masked_positions_cannot_poison_the_loss():
  """Padding rows may hold NaN or inf logits; with weight 0 they add nothing, not NaN."""
  logits = np.zeros((1, 3, 4), np.float32)
  logits[0, 2] = np.nan
  loss_sum, count, m = losses.cross_entropy(
    jnp.asarray(logits), jnp.zeros((1, 3), jnp.int32), jnp.array([[1.0, 1.0, 0.0]])
  )
  np.testing.assert_allclose(loss_sum, 2 * np.log(4), rtol=1e-6)
  assert float(count) == 2 and np.isfinite(float(m["accuracy"]))
  grad = jax.grad(
    lambda x: losses.cross_entropy(x, jnp.zeros((1, 3), jnp.int32), jnp.array([[1.0, 1.0, 0.0]]))[0]
  )(jnp.asarray(logits))
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
  saver.save(3, {"model": state}, {"host": {"grain": 3}, "config": {"note": "test"}})
  saver.close()
  _, want = step(state, put(batches[3]))

  fresh, step8, put8, shardings8 = setup("fsdp")
  restored, items = ckpt.Checkpointer(str(tmp_path / "ck")).restore(
    3, ckpt.abstract_like({"model": fresh}, {"model": shardings8})
  )
  restored = restored["model"]
  assert items == {"host": {"grain": 3}, "config": {"note": "test"}}
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
  """train.sample reads checkpoints saved under any layout onto one device, from a workdir
  given relative to the current directory (as the demo prints it), with the tokenizer the
  checkpoint carries: the run's tokenizer directory is not needed."""
  import dataclasses

  from data.tokenizer import CharTokenizer, tokenizer_to_json

  model_cfg = dataclasses.replace(CFG, scan_layers=scan)
  state, step, put, _ = setup("fsdp", cfg=model_cfg)
  assert len(state.params["embed"]["table_VxD"].sharding.device_set) == 8
  tok = CharTokenizer(sorted(set("ROMEO: thou art")))
  saver = ckpt.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  saver.save(
    1,
    {"model": state},
    {
      "config": {"model": dataclasses.asdict(model_cfg), "data": {"add_bos": False}},
      "tokenizer": tokenizer_to_json(tok),
    },
  )
  saver.close()
  assert not (tmp_path / "tokenizer").exists()
  monkeypatch.chdir(tmp_path.parent)
  cfg, data_cfg, params, got_tok = load_for_inference(tmp_path.name)
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
  saver.save(
    1,
    {"model": state},
    {
      "config": {"model": dataclasses.asdict(dataclasses.replace(CFG, n_layers=CFG.n_layers + 1))},
      "tokenizer": {"kind": "char", "chars": ["a"]},
    },
  )
  saver.close()
  with pytest.raises(ValueError, match=rf"missing from the checkpoint: \['blocks/{CFG.n_layers}/"):
    load_for_inference(str(tmp_path))


def test_inference_load_of_a_legacy_checkpoint_takes_the_workdir_tokenizer(tmp_path):
  """A checkpoint as earlier runs wrote it (one TrainState under 'state', the data iterator
  under 'data', no tokenizer) loads for inference, with the run's tokenizer, and resumes
  into a stage of one state with its data state as host state."""
  import dataclasses

  import orbax.checkpoint as ocp

  from data.tokenizer import CharTokenizer

  state, *_ = setup("dp")
  manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
  args = {
    "state": ocp.args.StandardSave(state),
    "config": ocp.args.JsonSave({"model": dataclasses.asdict(CFG)}),
    "data": ocp.args.JsonSave({"grain": 7}),
  }
  manager.save(1, args=ocp.args.Composite(**args))
  manager.wait_until_finished()
  manager.close()
  CharTokenizer(sorted(set("JULIET"))).save(tmp_path / "tokenizer")
  _, _, params, tok = load_for_inference(str(tmp_path))
  assert tok.chars == sorted(set("JULIET"))
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state.params))
  restored, items = ckpt.Checkpointer(str(tmp_path / "checkpoints")).restore(
    1, {"model": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)}
  )
  assert items["host"] == {"data": {"grain": 7}}
  jax.tree.map(np.testing.assert_array_equal, restored["model"].params, state.params)
