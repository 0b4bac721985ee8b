"""The chat REPL: streamed replies are the sampler's, turns keep their history, the CLI answers
piped lines and one-shot prompts, and says what is wrong in one line."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from data.chat import render_prompt
from data.tokenizer import CharTokenizer
from model.sampling import Sampler, SamplingConfig
from model.transformer import Transformer
from tests.model.conftest import build
from train.chat import Chat, ContextFull

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOK = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz ?!.,")))


def chat_for(name, temperature=0.0, max_new_tokens=12, **overrides):
  model = build(name, vocab_size=TOK.vocab_size, **overrides)
  graphdef, params = nnx.split(model)
  cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=5)
  return Chat(Sampler(graphdef, bucket=16), params, TOK, model.config, cfg, seed=3), graphdef


def call_reply(chat, graphdef, messages, rng):
  """The reply Sampler.__call__ gives for the rendered conversation: its tokens up to the first
  <|end|>, eos, bos or role marker."""
  prompt = render_prompt(TOK, messages)
  toks, mask = np.asarray([prompt], np.int32), np.ones((1, len(prompt)), np.int32)
  cfg = chat.cfg
  out = Sampler(graphdef)(chat.params, toks, mask, rng, cfg)
  ids = np.asarray(out.tokens_BxN[0])[np.asarray(out.mask_BxN[0]) > 0].tolist()
  stops = [TOK.end_id, TOK.eos_id, TOK.bos_id, *TOK.role_ids.values()]
  cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
  return TOK.decode(ids[:cut])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_streamed_replies_are_the_samplers_and_keep_the_history(temperature):
  chat, graphdef = chat_for("tiny", temperature)
  pieces = []
  first, cut = chat.reply("hello there", pieces.append)
  assert not cut
  assert "".join(pieces) == first, "the streamed pieces add up to the reply"
  turn_key = lambda i: jax.random.fold_in(jax.random.key(3), i)  # each turn draws its own
  assert first == call_reply(
    chat, graphdef, [{"role": "user", "content": "hello there"}], turn_key(0)
  )
  second, _ = chat.reply("and then?")
  history = [
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": first},
    {"role": "user", "content": "and then?"},
  ]
  assert second == call_reply(chat, graphdef, history, turn_key(1))
  assert chat.messages == history + [{"role": "assistant", "content": second}]
  chat.reset()
  assert chat.messages == []


def test_system_message_survives_reset():
  chat, _ = chat_for("tiny")
  chat.system = "be brief"
  chat.reset()
  chat.reply("hi")
  chat.reset()
  assert chat.messages == [{"role": "system", "content": "be brief"}]


class NeverStops:
  """The real sampler (its own max_seq_len check included) with stop tokens made 'a': a random
  model may end a reply at any turn, and this test is about the replies that do not."""

  def __init__(self, sampler):
    self.sampler = sampler

  def stream(self, *args):
    stops = {TOK.end_id, TOK.eos_id, TOK.bos_id, *TOK.role_ids.values()}
    for token in self.sampler.stream(*args):
      yield TOK.encode("a")[0] if token in stops else token


def test_learned_positions_cut_the_reply_then_refuse():
  """With a learned position table the reply stops at max_seq_len (and says it was cut); a
  conversation with no room left raises ContextFull and keeps its history."""
  chat, _ = chat_for("tiny_gpt2", max_new_tokens=30, max_seq_len=24)
  chat.sampler = NeverStops(chat.sampler)
  prompt_len = len(render_prompt(TOK, [{"role": "user", "content": "hi"}]))
  reply, cut = chat.reply("hi")
  assert cut and len(TOK.encode(reply)) == 24 - prompt_len
  before = list(chat.messages)
  with pytest.raises(ContextFull, match="max_seq_len is 24: /reset"):
    chat.reply("more")
  assert chat.messages == before
  chat.reset()
  assert chat.reply("hi")[1] and len(chat.messages) == 2, "/reset makes room again"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A two-step tiny_test run's workdir, trained once for the CLI tests."""
  root = tmp_path_factory.mktemp("chat_run")
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "train.main",
      "--config=configs/experiments/tiny_test.py",
      f"--workdir={root}",
      "--config.train.steps=2",
      "--config.train.eval_every=0",
    ],
    cwd=REPO,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  return str(root)


def cli_env():
  return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def chat_cli(*args, stdin=""):
  return subprocess.run(
    [sys.executable, "-m", "train.chat", *args],
    cwd=REPO,
    env=cli_env(),
    input=stdin,
    capture_output=True,
    text=True,
    timeout=300,
  )


def greedy_replies(workdir, lines, system=""):
  """What the run's model answers to `lines` in one conversation, in this process."""
  from train.weights import load_for_inference

  model_cfg, _, params, tok = load_for_inference(workdir)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
  cfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
  chat = Chat(Sampler(graphdef), params, tok, model_cfg, cfg, system=system)
  return [chat.reply(line)[0] for line in lines]


def test_cli_answers_each_piped_line_in_one_conversation(workdir):
  lines = ["hello there", "what next?"]
  out = chat_cli(
    f"--workdir={workdir}", "--max_new_tokens=8", "--temperature=0", stdin="\n".join(lines) + "\n"
  )
  assert out.returncode == 0, out.stderr[-2000:]
  want = "".join(f"assistant: {r}\n" for r in greedy_replies(workdir, lines))
  assert out.stdout == want


def test_cli_one_shot_prompt(workdir):
  out = chat_cli(
    f"--workdir={workdir}",
    "--max_new_tokens=8",
    "--temperature=0",
    "--prompt=hello there",
    "--system=be brief",
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout == greedy_replies(workdir, ["hello there"], system="be brief")[0] + "\n"
