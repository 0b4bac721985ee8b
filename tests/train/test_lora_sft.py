"""LoRA SFT on the SFT tests' task with known answers (word reversal)."""

import json

from tests.train.test_lora import TARGETS
from tests.train.test_sft import reversal_chats, sft_config
from train.stage import build_stage


def test_lora_sft_learns_reversal_on_a_base_that_echoes(tmp_path):
  """The SFT test's task with known answers, by LoRA: a base fine-tuned in full to echo a
  word (100 steps) learns to reverse it with rank-16 adapters alone (200 steps) to >= 90%
  greedy exact match on 64 held-out words (100% on seeds 0, 1 and 2: docs/lora.md)."""
  from tests.train.test_sft import exact_match
  from train import loop
  from train.weights import load_for_inference

  words = reversal_chats(tmp_path / "train.jsonl", 4000, seed=0)
  held_out = reversal_chats(tmp_path / "val.jsonl", 64, seed=1, exclude=set(words))
  with open(tmp_path / "echo.jsonl", "w") as f:
    for w in words:
      f.write(json.dumps({"prompt": w, "response": w}) + "\n")
  base = sft_config(tmp_path / "echo.jsonl", tmp_path / "val.jsonl", steps=100)
  base.data.batch_size, base.opt.warmup_steps = 16, 20
  loop.train(base, str(tmp_path / "base"))
  c = sft_config(tmp_path / "train.jsonl", tmp_path / "val.jsonl", steps=200)
  c.train.init_from = str(tmp_path / "base")
  c.data.batch_size, c.opt.warmup_steps, c.opt.lr = 16, 20, 1e-2
  c.model.lora_rank, c.model.lora_alpha, c.model.lora_targets = 16, 32.0, TARGETS
  loop.train(c, str(tmp_path / "lora"))
  c.model.lora_rank = 0  # replies from the folded weights, on the base's architecture
  stage = build_stage(c, str(tmp_path / "eval"))
  assert exact_match(stage, held_out) == 0.0, "the base echoes; it does not reverse"
  mesh = stage.mesh
  _, _, params, _ = load_for_inference(str(tmp_path / "lora"), mesh=mesh.mesh, rules=mesh.rules)
  got = exact_match(stage, held_out, params)
  assert got >= 0.9, f"held-out exact match {got:.2f} after LoRA SFT"
