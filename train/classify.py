"""Text classification as a stage: the decoder with a k-way head (model/transformer.py's
ScalarModel with model.num_classes = k) read at each text's last real token, trained with
cross-entropy; evaluation is held-out accuracy and a confusion matrix.

Data: JSONL records {"text": ..., "label": ...}; a label is a class name or an id. The class
names are data.labels (comma-separated, in order), else the sorted names found, else the ids
0..max. configs/experiments/classify_*.py start from a language model (train.init_from)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from data import sources
from data.arrays import padded_batches, split_held_out
from data.sources import DataError
from model.transformer import last_token_values
from train import distributed, metrics
from train import stage as stagelib
from train.pretrain import check_query_blocks

KEYS = {"tokens": 2, "mask": 2, "labels": 1}


@dataclasses.dataclass(frozen=True)
class ClassifyDataConfig:
  """What classification reads; configs/experiments/classify_*.py documents each field."""

  path: str = ""
  val_path: str = ""
  val_fraction: float = 0.1
  text_field: str = "text"
  label_field: str = "label"
  labels: str = ""
  tokenizer: str = "char"
  vocab_size: int = 2048
  seq_len: int = 128
  batch_size: int = 16
  eval_batch_size: int = 16
  seed: int = 0
  worker_count: int = 0

  def __post_init__(self):
    if not self.path:
      raise DataError("data.path is empty: give the JSONL of {text, label} records")
    if self.tokenizer not in stagelib.TOKENIZERS:
      raise DataError(
        f"data.tokenizer={self.tokenizer!r} is unknown; choose one of {', '.join(stagelib.TOKENIZERS)}"
      )
    for name in ("seq_len", "batch_size", "eval_batch_size", "vocab_size"):
      if getattr(self, name) <= 0:
        raise DataError(f"data.{name} must be > 0, got {getattr(self, name)}")


def read_examples(path: str, text_field: str, label_field: str) -> list[tuple[str, object, str]]:
  """(text, label, FILE:LINE) of each record; a record without text or label is named."""
  out = []
  for file, lineno, record in sources.iter_jsonl(path):
    text, label = record.get(text_field), record.get(label_field)
    if not isinstance(text, str):
      raise DataError(f"{file}:{lineno}: no text in field {text_field!r}")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
      raise DataError(f"{file}:{lineno}: field {label_field!r} must be a class name or id")
    out.append((text, label, f"{file}:{lineno}"))
  return out


def class_names(examples, labels: str) -> list[str]:
  """The classes in order: `labels` (comma-separated), the sorted names, or ids 0..max."""
  if labels:
    names = [n.strip() for n in labels.split(",")]
  elif all(isinstance(label, int) for _, label, _ in examples):
    names = [str(i) for i in range(max(label for _, label, _ in examples) + 1)]
  else:
    names = sorted({str(label) for _, label, _ in examples})
  if len(names) < 2:
    raise DataError(f"a classifier needs at least 2 classes, got {names}")
  return names


def encode(examples, tokenizer, names: list[str], seq_len: int, ids: bool) -> tuple[dict, dict]:
  """Arrays tokens and mask [N, seq_len] (texts cut to their first seq_len tokens, padded on
  the right) and labels [N]; stats of rows and texts cut. With `ids`, an int label is a
  class's position in `names`; else every label is matched by name."""
  index = {n: i for i, n in enumerate(names)}
  tokens = np.full((len(examples), seq_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(examples), seq_len), np.int32)
  labels = np.zeros(len(examples), np.int32)
  cut = 0
  for row, (text, label, where) in enumerate(examples):
    if ids and isinstance(label, int) and 0 <= label < len(names):
      labels[row] = label
    elif str(label) in index:
      labels[row] = index[str(label)]
    else:
      raise DataError(f"{where}: label {label!r} is not one of the classes {names}")
    ids = tokenizer.encode(text)
    if not ids:
      raise DataError(f"{where}: the text encodes to no tokens")
    cut += len(ids) > seq_len
    ids = ids[:seq_len]
    tokens[row, : len(ids)], mask[row, : len(ids)] = ids, 1
  return {"tokens": tokens, "mask": mask, "labels": labels}, {"rows": len(examples), "cut": cut}


def logits_at_last_token(model, batch, rng=None):
  """[B, k] logits read at each row's last real token (pad rows: a zero mask)."""
  mask = batch["mask"]
  return last_token_values(model(batch["tokens"], None, mask, dropout_rng=rng), mask)


def classify_loss(model, batch, rng):
  """Summed cross-entropy over the real rows, their count, and the correct predictions."""
  logits_BxK = logits_at_last_token(model, batch, rng)
  real_B = (jnp.max(batch["mask"], axis=1) > 0).astype(jnp.float32)
  logp_BxK = jax.nn.log_softmax(logits_BxK, axis=-1)
  nll_B = -jnp.take_along_axis(logp_BxK, batch["labels"][:, None], axis=1)[:, 0]
  correct_B = (jnp.argmax(logits_BxK, axis=-1) == batch["labels"]).astype(jnp.float32)
  return jnp.sum(nll_B * real_B), jnp.sum(real_B), {"accuracy": jnp.sum(correct_B * real_B)}


def confusion(labels: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
  """[k, k] counts: row = true class, column = predicted class."""
  out = np.zeros((k, k), np.int64)
  np.add.at(out, (labels, predicted), 1)
  return out


CORNER = "true \\ predicted"


def format_confusion(matrix: np.ndarray, names: list[str]) -> str:
  width = max(8, *(len(n) + 1 for n in names))
  lines = [f"{CORNER:<{width + 8}}" + "".join(f"{n:>{width}}" for n in names)]
  for name, row in zip(names, matrix):
    lines.append(f"{name:<{width + 8}}" + "".join(f"{int(c):>{width}}" for c in row))
  return "\n".join(lines)


class Classify(stagelib.BatchStage):
  """One classifier ('model'): a trunk from train.init_from (or random) and a new k-way head."""

  name = "classify"
  state_name = "model"
  echo_samples = True

  def __init__(self, config, workdir: str):
    self.train_cfg = tc = stagelib.section(stagelib.TrainConfig, config.train, "train")
    self.data_cfg = dc = stagelib.section(ClassifyDataConfig, config.data, "data")
    check_query_blocks(config, dc.seq_len)
    source = stagelib.init_source(tc)
    examples = read_examples(dc.path, dc.text_field, dc.label_field)
    if dc.val_path:
      held_out = read_examples(dc.val_path, dc.text_field, dc.label_field)
    else:
      examples, held_out = split_held_out(examples, dc.val_fraction, dc.seed)
    self.names = class_names(examples + held_out, dc.labels)
    # Int labels are positions when the names are given or every label is an int.
    ids = bool(dc.labels) or all(isinstance(label, int) for _, label, _ in examples + held_out)
    texts = [t for t, _, _ in examples + held_out]
    self.tokenizer = stagelib.stage_tokenizer(dc.tokenizer, dc.vocab_size, source, texts, workdir)
    fields = {**dict(config.model), "num_classes": len(self.names)}
    from train import weights

    if not fields.get("vocab_size"):
      fields["vocab_size"] = self.tokenizer.vocab_size
    self.model_cfg = weights.model_config(fields, source)
    self.opt_cfg = stagelib.opt_config(config, tc.steps)
    self.mesh = stagelib.make_mesh(config)
    self.mesh.check_batch("data.batch_size", dc.batch_size, self.opt_cfg.grad_accum)
    self.mesh.check_batch("data.eval_batch_size", dc.eval_batch_size)
    names, tok = self.names, self.tokenizer
    self.train_arrays, self.train_stats = encode(examples, tok, names, dc.seq_len, ids)
    self.val_arrays = encode(held_out, tok, names, dc.seq_len, ids)[0] if held_out else None
    self.model = stagelib.build_model(
      "scalar", self.model_cfg, self.opt_cfg, self.mesh, tc.seed, source, head_init="zero"
    )
    self.graphdef = self.model.graphdef
    self.states = {"model": self.model.state}
    self.state_shardings = {"model": self.model.shardings}
    self.n_params = self.model.n_params
    self.steps = {"model": stagelib.train_step(self.model, self.mesh, KEYS, classify_loss, "rows")}
    shardings = {k: self.mesh.batch_sharding(n) for k, n in KEYS.items()}
    self._predict = jax.jit(
      lambda p, b: jnp.argmax(logits_at_last_token(self._merge(p), b), axis=-1),
      in_shardings=(self.model.shardings.params, shardings),
    )
    self.tokens_per_iteration = dc.batch_size * dc.seq_len
    self.flops_per_token = metrics.flops_per_token(self.model_cfg, self.n_params, dc.seq_len)
    self._it = self.batch_iterator("classify")

  def _merge(self, params):
    from flax import nnx

    from model import axes

    with axes.axis_rules(self.mesh.mesh, self.mesh.rules):
      return nnx.merge(self.graphdef, params)

  @property
  def params(self):
    return self.states["model"].params

  def models(self):
    return {"model": ("scalar", self.model_cfg)}

  def checkpoint_items(self):
    return {"classes": self.names}

  def predictions(self, params=None) -> tuple[np.ndarray, np.ndarray]:
    """(true class, predicted class) of every held-out text, in order."""
    size = self.data_cfg.eval_batch_size
    block, blocks = self.mesh.block(size)
    params = self.params if params is None else params
    predicted = []
    for batch in padded_batches(self.val_arrays, size, block=block, blocks=blocks):
      predicted.append(distributed.gather(self._predict(params, self.mesh.shard(batch))))
    n = len(self.val_arrays["labels"])
    return self.val_arrays["labels"], np.concatenate(predicted)[:n]

  def evaluate(self, params=None) -> dict:
    """Held-out accuracy over every held-out text (the confusion matrix: `samples`)."""
    if self.val_arrays is None:
      return {}
    labels, predicted = self.predictions(params)
    return {"accuracy": float(np.mean(labels == predicted)), "rows": float(len(labels))}

  def samples(self, seed: int) -> dict[str, str]:
    """The confusion matrix as a table (the log and TensorBoard's text tab)."""
    del seed
    if self.val_arrays is None:
      return {}
    labels, predicted = self.predictions()
    return {
      "confusion": format_confusion(confusion(labels, predicted, len(self.names)), self.names)
    }


def build(config, workdir: str) -> Classify:
  return Classify(config, workdir)
