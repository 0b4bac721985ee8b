"""An open checkpoint as it ships (Qwen2 weights, tokenizer.json, a chat template in
tokenizer_config.json) is the init_from of SFT, DPO and PPO, and the chat REPL talks to the
result with the checkpoint's own template."""

import json

import numpy as np
import pytest

from configs import base
from tests.convert.conftest import randomize
from tests.data.test_hf_tokenizer import TEMPLATE, write_folder


@pytest.fixture(scope="module")
def open_model(tmp_path_factory):
  from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

  folder = write_folder(tmp_path_factory.mktemp("open") / "qwen", TEMPLATE)
  vocab = len(AutoTokenizer.from_pretrained(str(folder)))
  config = Qwen2Config(
    vocab_size=vocab,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
  )
  randomize(Qwen2ForCausalLM(config), seed=4).save_pretrained(str(folder))
  return folder


def write_chats(path, n=24):
  words = ["abc", "hello", "qwen", "token", "chat", "model"] * (n // 6)
  with open(path, "w") as f:
    for w in words:
      f.write(json.dumps({"prompt": w, "response": w[::-1]}) + "\n")
  return path


def test_sft_from_an_open_checkpoint_trains_on_its_template_and_chats_with_it(open_model, tmp_path):
  from transformers import AutoTokenizer

  from data.chat import render_chat
  from tests.train.test_sft import sft_config
  from train import loop
  from train.chat import Chat
  from train.stage import build_stage
  from train.weights import load_for_inference

  c = sft_config(write_chats(tmp_path / "chats.jsonl"), steps=2, checkpoint_every=2)
  c.model = base.runtime_model()
  c.train.init_from = str(open_model)
  stage = build_stage(c, str(tmp_path / "look"))
  theirs = AutoTokenizer.from_pretrained(str(open_model))
  chat = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "cba"}]
  ids, mask = render_chat(stage.tokenizer, chat)
  assert ids == theirs.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
  # The rows train on the assistant's turn alone: 'cba<|im_end|>\n' after its cue.
  row = stage.train_arrays
  first = row["segment_ids"][0] == 1
  targets = row["targets"][0][first][row["loss_mask"][0][first] > 0]
  assert theirs.decode(targets.tolist()) == "cba<|im_end|>\n"
  loop.train(c, str(tmp_path / "sft"))

  cfg, _, params, tok = load_for_inference(str(tmp_path / "sft"))
  assert tok.chat_template is not None and cfg.qkv_bias
  from flax import nnx

  from model.sampling import Sampler, SamplingConfig
  from model.transformer import Transformer

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  talk = Chat(Sampler(graphdef), params, tok, cfg, SamplingConfig(max_new_tokens=4))
  sent = []
  talk.sampler = _Recording(talk.sampler, sent)
  talk.reply("hello")
  want = theirs.apply_chat_template(
    [{"role": "user", "content": "hello"}],
    add_generation_prompt=True,
    tokenize=True,
    return_dict=True,
  )["input_ids"]
  assert sent[0] == want


class _Recording:
  """A sampler that records the prompt ids it is given."""

  def __init__(self, sampler, sent):
    self.sampler, self.sent = sampler, sent

  def __getattr__(self, name):
    return getattr(self.sampler, name)

  def stream(self, params, prompt_BxP, mask_BxP, *args, **kwargs):
    row = np.asarray(prompt_BxP)[0][np.asarray(mask_BxP)[0] > 0]
    self.sent.append(row.tolist())
    return self.sampler.stream(params, prompt_BxP, mask_BxP, *args, **kwargs)


@pytest.mark.parametrize("stage", ["dpo", "ppo"])
def test_dpo_and_ppo_start_from_an_open_checkpoint(open_model, tmp_path, stage):
  from tests.train.test_lora import write_pairs
  from train.stage import build_stage

  if stage == "dpo":
    from configs.experiments import dpo_tiny_test

    write_pairs(tmp_path / "pairs.jsonl", 12, seed=2)
    c = dpo_tiny_test.get_config()
    c.data.path, c.data.val_fraction = str(tmp_path / "pairs.jsonl"), 0.0
  else:
    from tests.rlhf.test_ppo import ppo_config

    c = ppo_config(tmp_path, "tests.rlhf.test_ppo:letters_reward", response_len=3)
  c.model = base.runtime_model()
  c.train.init_from = str(open_model)
  built = build_stage(c, str(tmp_path / stage))
  assert built.tokenizer.chat_template is not None
  for name, batch in built.updates():
    built.states[name], metrics = built.steps[name](built.states[name], batch)
  assert np.isfinite(float(metrics["loss"]))
