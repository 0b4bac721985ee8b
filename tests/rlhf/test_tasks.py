"""The addition task's files and scores (rlhf/tasks.py), against Python's own integers, and read
back through the readers every stage uses."""

import json
import math

import numpy as np
import pytest

from data import sources
from rlhf import tasks


def read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def parsed(text: str) -> tuple[int, int]:
  """'a+b=' by hand, independent of tasks.parse."""
  i = text.index("+")
  return int(text[:i]), int(text[i + 1 : text.index("=")])


def test_the_files_hold_every_problem_once_and_keep_the_held_out_ones_out(tmp_path):
  files = tasks.write_files(str(tmp_path), seed=3)
  pretrain = [r["text"] for r in read(files["pretrain"])]
  sft = read(files["sft"])
  prompts = read(files["prompts"])
  held = read(files["heldout"])
  every = {(a, b) for a in range(10, 100) for b in range(10, 100)}
  held_set = {parsed(r["prompt"]) for r in held}
  train_set = {parsed(r["prompt"]) for r in prompts}
  assert len(held) == len(held_set) == round(0.1 * len(every))
  assert train_set | held_set == every and not train_set & held_set
  assert {parsed(r["prompt"]) for r in sft} == train_set == {parsed(e) for e in pretrain}
  for e in pretrain:  # correct equations
    a, b = parsed(e)
    assert e == f"{a}+{b}={a + b}"
  for r in prompts + held:
    a, b = parsed(r["prompt"])
    assert r["answer"] == str(a + b)
  assert set(map(json.dumps, read(files["pretrain_val"]))) <= set(
    map(json.dumps, read(files["pretrain"]))
  )
  # Another seed holds out other problems.
  other = tasks.write_files(str(tmp_path / "other"), seed=4)
  assert {parsed(r["prompt"]) for r in read(other["heldout"])} != held_set
  # Each file reads as a user's file of its kind would.
  chats = list(sources.read_chat(files["sft"]))
  assert len(chats) == len(sft)
  assert [m["content"] for m in chats[0]] == [sft[0]["prompt"], sft[0]["response"]]
  assert len(list(sources.read_prompts(files["prompts"]))) == len(prompts)
  assert len(list(sources.read_jsonl_text(files["pretrain"]))) == len(pretrain)


def test_the_demonstrator_drops_the_carry_on_its_share_of_carry_cases_only(tmp_path):
  files = tasks.write_files(str(tmp_path), seed=0)
  dropped, carry_cases = 0, 0
  for r in read(files["sft"]):
    a, b = parsed(r["prompt"])
    if a % 10 + b % 10 >= 10:
      carry_cases += 1
      assert r["response"] in (str(a + b), str(a + b - 10))
      dropped += r["response"] == str(a + b - 10)
    else:
      assert r["response"] == str(a + b)
  # Binomial(n, 0.6): within 4 standard deviations.
  sd = math.sqrt(carry_cases * 0.6 * 0.4)
  assert abs(dropped - 0.6 * carry_cases) < 4 * sd, (dropped, carry_cases)


def test_pairs_choose_the_true_sum_and_drop_ties():
  prompts = ["37+45=", "37+45=", "10+11=", "19+19=", "50+50="]
  first = ["82", "72", "21", "28", "100"]
  second = ["72", " 82 ", "21", "18", "99"]
  pairs, counts = tasks.preference_pairs(prompts, first, second)
  assert counts == {"pairs": 3, "ties_dropped": 2}  # both right (10+11), both wrong (19+19)
  assert pairs == [
    {"prompt": "37+45=", "chosen": "82", "rejected": "72"},
    {"prompt": "37+45=", "chosen": "82", "rejected": "72"},
    {"prompt": "50+50=", "chosen": "100", "rejected": "99"},
  ]


def test_exact_match_and_accuracy_against_integers():
  rng = np.random.default_rng(0)
  problems = [(int(a), int(b)) for a, b in rng.integers(10, 100, size=(300, 2))]
  prompts = [f"{a}+{b}=" for a, b in problems]
  offsets = rng.choice([0, 0, 0, -10, 1], size=len(problems))
  completions = [str(a + b + int(d)) for (a, b), d in zip(problems, offsets)]
  records = [{"prompt": p, "answer": str(a + b)} for p, (a, b) in zip(prompts, problems)]
  assert tasks.exact_match(records, completions) == [float(d == 0) for d in offsets]
  got = tasks.accuracy(prompts, completions)
  carry = np.array([a % 10 + b % 10 >= 10 for a, b in problems])
  right = offsets == 0
  assert got["exact_match"] == pytest.approx(right.mean())
  assert got["carry_exact_match"] == pytest.approx(right[carry].mean())
  assert got["no_carry_exact_match"] == pytest.approx(right[~carry].mean())
  assert got["problems"] == len(problems)
  # A completion that is no number is wrong, not an error.
  assert tasks.exact_match(records[:1], ["<|end|>"]) == [0.0]
