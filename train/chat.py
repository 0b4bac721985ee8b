"""Command line: chat with a run's model, e.g. python -m train.chat --workdir=DIR.

Reads a user line at a time (a '> ' prompt on a terminal; piped stdin is read line by line to
its end), keeps the conversation, and streams each reply as it is sampled. `--prompt` answers
one message and exits. Commands: /reset clears the conversation, /exit quits."""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import numpy as np
from absl import flags, logging

from data.chat import render_prompt
from train import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "a training run's workdir")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_PROMPT = flags.DEFINE_string("prompt", None, "answer this one message and exit")
_SYSTEM = flags.DEFINE_string("system", "", "a system message that opens the conversation")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "0 for greedy")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus mass (1: all)")
_TOP_K = flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0: all)")
_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "most tokens in one reply")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
flags.mark_flag_as_required("workdir")

COMMANDS = ("/reset", "/exit")


class ContextFull(Exception):
  """The conversation leaves no room for a reply within the model's positions."""


class Chat:
  """A conversation with a model: the message history, rendered with the chat template, and
  replies streamed from `Sampler.stream` until <|end|>, eos, bos or a role marker."""

  def __init__(self, sampler, params, tokenizer, model_cfg, cfg, seed: int = 0, system: str = ""):
    """`cfg` (a SamplingConfig) sets how tokens are picked and the longest reply."""
    self.sampler, self.params, self.tok, self.model_cfg = sampler, params, tokenizer, model_cfg
    self.cfg = dataclasses.replace(cfg, eos_id=tokenizer.end_id, pad_id=tokenizer.pad_id)
    # A role marker (or bos) means the model began another turn: the reply ends there, which
    # also keeps markers out of the history, re-encoded as plain text every turn.
    self.stops = {
      tokenizer.end_id,
      tokenizer.eos_id,
      tokenizer.bos_id,
      *tokenizer.role_ids.values(),
    }
    self.seed, self.system = seed, system
    self.turn = 0
    self.reset()

  def reset(self):
    self.messages = [{"role": "system", "content": self.system}] if self.system else []

  def reply(self, text: str, write=lambda piece: None) -> tuple[str, bool]:
    """Answers a user message: (the reply, whether it was cut at the model's max_seq_len).
    `write` gets each new piece of text as it is sampled. Raises ContextFull, leaving the
    history as it was, when there is no room for a reply."""
    messages = self.messages + [{"role": "user", "content": text}]
    prompt = render_prompt(self.tok, messages)
    n = self.cfg.max_new_tokens
    limited = self.model_cfg.position == "learned"
    if limited:  # a learned position table has no row past max_seq_len
      room = self.model_cfg.max_seq_len - len(prompt)
      if room <= 0:
        raise ContextFull(
          f"the conversation is {len(prompt)} tokens and the model's max_seq_len is "
          f"{self.model_cfg.max_seq_len}: /reset to start over"
        )
      n = min(n, room)
    cfg = dataclasses.replace(self.cfg, max_new_tokens=n)
    rng = jax.random.fold_in(jax.random.key(self.seed), self.turn)
    tokens_1xP = np.asarray([prompt], np.int32)
    ids, shown, ended = [], "", False
    for token in self.sampler.stream(self.params, tokens_1xP, np.ones_like(tokens_1xP), rng, cfg):
      if token in self.stops:
        ended = True
        break
      ids.append(token)
      text_so_far = self.tok.decode(ids)
      if text_so_far.endswith("\ufffd"):  # a character whose bytes are still arriving
        continue
      write(_new_suffix(shown, text_so_far))
      shown = text_so_far
    reply = self.tok.decode(ids)
    write(_new_suffix(shown, reply))
    self.messages = messages + [{"role": "assistant", "content": reply}]
    self.turn += 1
    return reply, limited and not ended and len(ids) == n < self.cfg.max_new_tokens


def _new_suffix(shown: str, text: str) -> str:
  """What to print after `shown` for `text`. A later token can change how earlier ones decode,
  and printed text cannot be taken back: then the text after the common prefix is printed."""
  common = 0
  while common < min(len(shown), len(text)) and shown[common] == text[common]:
    common += 1
  return text[common:]


def _lines(interactive: bool):
  """User lines: from the terminal with a '> ' prompt, or from piped stdin until its end."""
  while True:
    if interactive:
      try:
        line = input("> ")
      except EOFError:
        print()
        return
    else:
      line = sys.stdin.readline()
      if not line:
        return
    yield line.rstrip("\n")


def _answer(chat: Chat, text: str, marker: str) -> bool:
  """Streams one reply to stdout; False when the conversation has no room left."""
  try:
    sys.stdout.write(marker)
    _, cut = chat.reply(text, lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
  except ContextFull as e:
    sys.stdout.write("\n")
    print(f"chat: {e}", file=sys.stderr)
    return False
  sys.stdout.write("\n")
  sys.stdout.flush()
  if cut:
    print(
      f"chat: reply cut at the model's max_seq_len {chat.model_cfg.max_seq_len}; "
      "/reset to start over",
      file=sys.stderr,
    )
  return True


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from flax import nnx

  from model.sampling import Sampler, SamplingConfig
  from model.transformer import Transformer
  from train.weights import load_for_inference

  if not os.path.isdir(os.path.join(_WORKDIR.value, "checkpoints")):
    raise FileNotFoundError(
      f"{_WORKDIR.value} has no checkpoints/: give the workdir of a training run "
      "(python -m train.main --workdir=DIR)"
    )
  cfg = SamplingConfig(
    max_new_tokens=_TOKENS.value,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
  )
  model_cfg, _, params, tok = load_for_inference(_WORKDIR.value, _STEP.value)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
  chat = Chat(Sampler(graphdef), params, tok, model_cfg, cfg, _SEED.value, _SYSTEM.value)

  if _PROMPT.value is not None:
    return 0 if _answer(chat, _PROMPT.value, "") else 1
  interactive = sys.stdin.isatty()
  for line in _lines(interactive):
    if not line.strip():
      continue
    if line.strip() == "/exit":
      break
    if line.strip() == "/reset":
      chat.reset()
      print("chat: conversation cleared", file=sys.stderr)
      continue
    if line.startswith("/"):
      print(
        f"chat: unknown command {line.split()[0]!r}; commands: {', '.join(COMMANDS)}",
        file=sys.stderr,
      )
      continue
    # On a terminal the '> ' prompt tells turns apart; piped output marks each reply.
    _answer(chat, line, "" if interactive else "assistant: ")
  return 0


if __name__ == "__main__":
  cli.run(main)
