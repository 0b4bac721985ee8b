"""A task with known answers for the whole pipeline: two-digit addition (`37+45=82`).

The task writes JSONL files and scores answers; the stages read the files as they read any
user's data. Problems are a + b with a, b in [10, 99]; a carry case is one whose units carry
(a % 10 + b % 10 >= 10). A fixed share of the problems is held out of every file and only
evaluated on.

- pretraining corpus: correct equations, one document each ({"text": "37+45=82"});
- SFT demonstrations: {"prompt": "37+45=", "response": answer} from a flawed demonstrator
  that drops the carry (answers a + b - 10) on `drop_rate` of the carry cases;
- preference pairs: two samples of the SFT model per prompt, the correct one chosen, pairs
  with both right or both wrong dropped;
- RL prompts: {"prompt": "37+45=", "answer": "82"}, scored by `exact_match`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

LOW, HIGH = 10, 99
DROP_RATE = 0.6  # the demonstrator's share of carry cases answered without the carry


def problems() -> list[tuple[int, int]]:
  """Every (a, b) with two-digit a and b, in a fixed order."""
  return [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]


def split(held_out: float = 0.1, seed: int = 0) -> tuple[list, list]:
  """(train, held-out) problems: a seeded random `held_out` share kept out of every file."""
  all_problems = problems()
  order = np.random.default_rng(seed).permutation(len(all_problems))
  k = int(round(len(all_problems) * held_out))
  held = sorted(all_problems[i] for i in order[:k])
  train = [all_problems[i] for i in sorted(order[k:])]
  return train, held


def prompt(a: int, b: int) -> str:
  return f"{a}+{b}="


def answer(a: int, b: int) -> str:
  return str(a + b)


def carries(a: int, b: int) -> bool:
  return a % 10 + b % 10 >= 10


def demonstration(a: int, b: int, rng: np.random.Generator, drop_rate: float = DROP_RATE) -> str:
  """The flawed demonstrator's answer: the carry dropped on `drop_rate` of carry cases."""
  if carries(a, b) and rng.random() < drop_rate:
    return str(a + b - 10)
  return answer(a, b)


def parse(a_plus_b: str) -> tuple[int, int]:
  """(a, b) of a prompt 'a+b=' (or of an equation's left side)."""
  left = a_plus_b.split("=")[0]
  a, b = left.split("+")
  return int(a), int(b)


def exact_match(records: Sequence[dict], completions: Sequence[str]) -> list[float]:
  """The programmatic reward: 1 when the completion is the record's answer, else 0."""
  return [float(c.strip() == str(r["answer"])) for r, c in zip(records, completions)]


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
  """Writes rows as JSONL; returns how many."""
  n = 0
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
      n += 1
  return n


def write_files(out_dir: str, seed: int = 0, held_out: float = 0.1) -> dict[str, str]:
  """Writes the task's files into out_dir; returns name -> path:

  pretrain.jsonl / pretrain_val.jsonl (equations: the training problems, and a tenth of them
  for the validation loss), sft.jsonl (demonstrations of the training problems), prompts.jsonl
  (RL prompts with answers) and heldout.jsonl (held-out prompts with answers)."""
  os.makedirs(out_dir, exist_ok=True)
  train, held = split(held_out, seed)
  rng = np.random.default_rng(seed + 1)
  paths = {
    name: os.path.join(out_dir, f"{name}.jsonl")
    for name in ("pretrain", "pretrain_val", "sft", "prompts", "heldout")
  }
  order = rng.permutation(len(train))
  equations = [f"{prompt(a, b)}{answer(a, b)}" for a, b in (train[i] for i in order)]
  write_jsonl(paths["pretrain"], ({"text": e} for e in equations))
  write_jsonl(paths["pretrain_val"], ({"text": e} for e in equations[: len(equations) // 10]))
  write_jsonl(
    paths["sft"],
    ({"prompt": prompt(a, b), "response": demonstration(a, b, rng)} for a, b in train),
  )
  write_jsonl(
    paths["prompts"], ({"prompt": prompt(a, b), "answer": answer(a, b)} for a, b in train)
  )
  write_jsonl(paths["heldout"], ({"prompt": prompt(a, b), "answer": answer(a, b)} for a, b in held))
  return paths


def preference_pairs(
  prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
) -> tuple[list[dict], dict]:
  """Pairs from two samples per prompt, labelled by the true answer: the correct completion
  is chosen; pairs with both right or both wrong are ties, dropped and counted."""
  pairs, ties = [], 0
  for p, x, y in zip(prompts, first, second):
    truth = answer(*parse(p))
    right_x, right_y = x.strip() == truth, y.strip() == truth
    if right_x == right_y:
      ties += 1
      continue
    chosen, rejected = (x, y) if right_x else (y, x)
    pairs.append({"prompt": p, "chosen": chosen.strip(), "rejected": rejected.strip()})
  return pairs, {"pairs": len(pairs), "ties_dropped": ties}


def accuracy(prompts: Sequence[str], completions: Sequence[str]) -> dict[str, float]:
  """Exact match overall and on carry cases (completions stripped)."""
  right = np.array([c.strip() == answer(*parse(p)) for p, c in zip(prompts, completions)])
  carry = np.array([carries(*parse(p)) for p in prompts])
  return {
    "exact_match": float(right.mean()),
    "carry_exact_match": float(right[carry].mean()) if carry.any() else float("nan"),
    "no_carry_exact_match": float(right[~carry].mean()) if (~carry).any() else float("nan"),
    "problems": float(len(prompts)),
  }
