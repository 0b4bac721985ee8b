"""Classification: a separable task made here is learnt to >= 95% held-out accuracy, the
confusion matrix counts every held-out text once (against NumPy), and bad records are named."""

import json

import numpy as np
import pytest

from data.sources import DataError
from train import classify
from train.stage import build_stage

ALPHABETS = {"low": "abcdef", "mid": "ghijkl", "high": "mnopqr", "end": "stuvwx"}


def write_texts(path, n, seed, ids=False):
  """Each text: 6-14 letters from its class's own alphabet, so the class is in every letter."""
  rng = np.random.default_rng(seed)
  names = sorted(ALPHABETS)
  with open(path, "w") as f:
    for _ in range(n):
      k = int(rng.integers(len(names)))
      text = "".join(rng.choice(list(ALPHABETS[names[k]]), int(rng.integers(6, 15))))
      f.write(json.dumps({"text": text, "label": k if ids else names[k]}) + "\n")


def config(tmp_path, **data):
  from configs.experiments import classify_tiny_test

  c = classify_tiny_test.get_config()
  write_texts(tmp_path / "train.jsonl", 800, seed=0)
  write_texts(tmp_path / "val.jsonl", 120, seed=1)
  c.data.path, c.data.val_path = str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")
  c.data.update(data)
  return c


def test_classifier_learns_a_separable_task_and_counts_its_confusion(tmp_path):
  from train import loop

  c = config(tmp_path)
  before = build_stage(c, str(tmp_path / "init"))
  assert before.names == sorted(ALPHABETS) and before.model_cfg.num_classes == 4
  assert before.evaluate()["accuracy"] < 0.5
  summary = loop.train(c, str(tmp_path / "run"))
  stage = build_stage(c, str(tmp_path / "run"))  # resumes nothing new: read the final state
  from train.weights import load_for_inference

  _, _, params, _ = load_for_inference(str(tmp_path / "run"))
  labels, predicted = stage.predictions(params)
  assert len(labels) == 120 and np.mean(labels == predicted) >= 0.95, summary
  want = np.zeros((4, 4), int)
  for t, p in zip(labels, predicted):
    want[t, p] += 1
  np.testing.assert_array_equal(classify.confusion(labels, predicted, 4), want)
  assert want.sum() == 120
  table = classify.format_confusion(want, stage.names)
  assert table.count("\n") == 4 and "high" in table


def test_ids_and_names_and_bad_records(tmp_path):
  write_texts(tmp_path / "ids.jsonl", 20, seed=2, ids=True)
  examples = classify.read_examples(str(tmp_path / "ids.jsonl"), "text", "label")
  top = max(label for _, label, _ in examples)
  assert classify.class_names(examples, "") == [str(i) for i in range(top + 1)]
  assert classify.class_names(examples, "a,b,c,d") == ["a", "b", "c", "d"]
  # Names found by sorting: an int label is a name too, never a position in the sorted list.
  mixed = [("ab", 1, "x:1"), ("cd", "10", "x:2"), ("ef", "2", "x:3")]
  names = classify.class_names(mixed, "")
  assert names == ["1", "10", "2"]

  class Chars:
    pad_id = 0
    encode = staticmethod(lambda text: [ord(c) for c in text])

  arrays, _ = classify.encode(mixed, Chars(), names, 4, ids=False)
  assert arrays["labels"].tolist() == [0, 1, 2]
  with open(tmp_path / "bad.jsonl", "w") as f:
    f.write(json.dumps({"text": "abc", "label": "low"}) + "\n")
    f.write(json.dumps({"text": "abc", "label": 1.5}) + "\n")
  with pytest.raises(DataError, match="bad.jsonl:2: field 'label' must be a class name or id"):
    classify.read_examples(str(tmp_path / "bad.jsonl"), "text", "label")
  with pytest.raises(DataError, match=r"train.jsonl:1: label '\w+' is not one of the classes"):
    c = config(tmp_path, labels="a,b,c,d")
    build_stage(c, str(tmp_path / "run"))
