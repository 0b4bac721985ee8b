"""A checkpoint's own chat template (Jinja, from its tokenizer_config.json), rendered as
transformers renders it, with the character spans of what the assistant wrote: the SFT loss
mask. Templates that mark those spans with {% generation %} give them directly; for the
rest, each assistant turn is what rendering the conversation through it adds to rendering
the conversation before it with the generation prompt."""

from __future__ import annotations

import contextvars
import datetime
import json
import re
from collections.abc import Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from data.sources import DataError

_SPANS: contextvars.ContextVar = contextvars.ContextVar("fromscratch_generation", default=None)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _Generation(Extension):
  """{% generation %}...{% endgeneration %} around the assistant's text: while rendering,
  the span its output takes in the whole text is recorded."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

  def _mark(self, caller):
    text = caller()
    state = _SPANS.get()
    if state is not None:  # the text before it has been streamed into `blocks`
      blocks, spans = state
      start = sum(len(b) for b in blocks)
      spans.append((start, start + len(text)))
    return text


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(
    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
  )


class ChatTemplate:
  """A Jinja chat template and the special tokens it is rendered with (bos_token, ...)."""

  def __init__(self, source: str, specials: dict[str, str], where: str = "chat template"):
    self.source, self.specials, self.where = source, dict(specials), where
    env = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
      self._template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise DataError(
        f"{where}: the chat template does not parse (line {e.lineno}): {e.message}"
      ) from None
    self.marks_generation = bool(_GENERATION_TAG.search(source))

  def render(
    self, messages: Sequence[dict], add_generation_prompt: bool = False
  ) -> tuple[str, list[tuple[int, int]]]:
    """The text, and the spans {% generation %} marked in it."""
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _SPANS.set((blocks, spans))
    try:
      for block in self._template.generate(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **self.specials
      ):
        blocks.append(block)
    except jinja2.TemplateError as e:
      raise DataError(f"{self.where}: rendering the chat template failed: {e}") from None
    finally:
      _SPANS.reset(token)
    return "".join(blocks), spans

  def assistant_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation's text and the character spans of the assistant's turns."""
    text, spans = self.render(messages)
    if self.marks_generation:
      return text, spans
    spans = []
    for i, m in enumerate(messages):
      if m.get("role") != "assistant":
        continue
      before, _ = self.render(messages[:i], add_generation_prompt=True)
      through, _ = self.render(messages[: i + 1])
      if not (through.startswith(before) and text.startswith(through)):
        raise DataError(
          f"{self.where}: the chat template renders turn {i} differently once later turns "
          "follow, so the assistant's tokens cannot be told apart; mark the assistant's text "
          "with {% generation %}...{% endgeneration %} in the template"
        )
      spans.append((len(before), len(through)))
    return text, spans
