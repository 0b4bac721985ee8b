"""Tokenizers: sentencepiece (BPE/unigram, byte fallback) and character-level, one interface
(data/hf_tokenizer.py puts a Hugging Face tokenizer.json behind it)."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from data.sources import DataError

# Chat role markers used by the SFT template; each encodes to a single id.
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
UNKNOWN = "\ufffd"  # what an id outside the vocabulary decodes to
SPECIAL_PIECES = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}
_META_FILE = "tokenizer.json"
_SP_MODEL_FILE = "sentencepiece.model"


class _Specials:
  """Shared accessors: the special ids are what the batch code relies on."""

  bos_id: int
  eos_id: int
  pad_id: int
  end_id: int
  role_ids: dict[str, int]

  @property
  def start_id(self) -> int:
    """What an unconditional sample starts from: bos, or eos where a tokenizer has no bos
    (Qwen's, whose documents are separated by their end token)."""
    return self.eos_id if self.bos_id is None else self.bos_id

  def encode_batch(
    self, texts: Sequence[str], *, bos: bool = False, eos: bool = False
  ) -> list[list[int]]:
    return [self.encode(t, bos=bos, eos=eos) for t in texts]

  def decode_batch(self, ids_batch: Iterable[Sequence[int]]) -> list[str]:
    return [self.decode(ids) for ids in ids_batch]


class SentencePieceTokenizer(_Specials):
  """A sentencepiece model with fixed special ids: unk 0, bos 1, eos 2, pad 3, then roles."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id()
    self.role_ids = {r: self._sp.piece_to_id(p) for r, p in ROLE_TOKENS.items()}
    self.end_id = self._sp.piece_to_id(END_TOKEN)

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    return self._sp.encode(text, add_bos=bos, add_eos=eos)

  def encode_batch(
    self, texts: Sequence[str], *, bos: bool = False, eos: bool = False
  ) -> list[list[int]]:
    # sentencepiece encodes a list on its own thread pool.
    return self._sp.encode(list(texts), add_bos=bos, add_eos=eos)

  def decode(self, ids: Sequence[int]) -> str:
    # A model's vocabulary may be padded past the tokenizer's (GPT-2's 50257 to 50304): such
    # ids decode to U+FFFD, visibly, as sentencepiece shows unknown bytes.
    out, run = [], []
    for i in map(int, ids):
      if i == self.pad_id:
        continue
      if 0 <= i < self.vocab_size:
        run.append(i)
      else:
        out.append(self._sp.decode(run) + UNKNOWN)
        run = []
    return "".join(out) + self._sp.decode(run)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def save(self, directory: str | os.PathLike) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, _SP_MODEL_FILE), "wb") as f:
      f.write(self.model_proto)
    _write_meta(
      directory, {"kind": self.kind, "model_file": _SP_MODEL_FILE, "vocab_size": self.vocab_size}
    )


class CharTokenizer(_Specials):
  """Character ids as nanoGPT shakespeare_char (sorted unique chars), specials appended."""

  kind = "char"

  def __init__(self, chars: Sequence[str]):
    if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
      raise DataError("CharTokenizer needs a sorted list of distinct characters")
    self.chars = list(chars)
    n = len(self.chars)
    specials = [
      SPECIAL_PIECES["bos"],
      SPECIAL_PIECES["eos"],
      SPECIAL_PIECES["pad"],
      *ROLE_TOKENS.values(),
      END_TOKEN,
    ]
    self.bos_id, self.eos_id, self.pad_id = n, n + 1, n + 2
    self.role_ids = {r: n + 3 + k for k, r in enumerate(ROLE_TOKENS)}
    self.end_id = n + 3 + len(ROLE_TOKENS)
    self.vocab_size = n + len(specials)
    # Decoding table: control tokens decode to nothing, role markers to their text.
    self._itos = self.chars + ["", "", ""] + [*ROLE_TOKENS.values(), END_TOKEN]
    # Sorted codepoints let encode map a whole string with one searchsorted.
    self._codes = np.array([ord(c) for c in self.chars], dtype=np.int64)

  @classmethod
  def from_text(cls, text: str | Iterable[str]) -> CharTokenizer:
    """Builds the vocabulary from a string, or from an iterable of strings (streamed)."""
    if isinstance(text, str):
      text = [text]
    chars: set[str] = set()
    for t in text:
      chars.update(t)
    if not chars:
      raise DataError(
        "CharTokenizer.from_text got an empty corpus: no characters to build a vocabulary"
      )
    return cls(sorted(chars))

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.searchsorted(self._codes, codes)
    ids_clipped = np.minimum(ids, len(self._codes) - 1)
    bad = self._codes[ids_clipped] != codes if len(codes) else np.zeros(0, bool)
    if bad.any():
      missing = sorted({chr(c) for c in codes[bad]})
      raise DataError(f"characters not in the CharTokenizer vocabulary: {missing!r}")
    out = ids.tolist()
    return ([self.bos_id] if bos else []) + out + ([self.eos_id] if eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    n = len(self._itos)  # ids past it (a padded model vocabulary) show as U+FFFD
    return "".join(
      self._itos[i] if 0 <= i < n else UNKNOWN for i in map(int, ids) if i != self.pad_id
    )

  def save(self, directory: str | os.PathLike) -> None:
    os.makedirs(directory, exist_ok=True)
    _write_meta(directory, {"kind": self.kind, "chars": self.chars, "vocab_size": self.vocab_size})


Tokenizer = Any  # SentencePieceTokenizer | CharTokenizer | data.hf_tokenizer.HFTokenizer


def _write_meta(directory, meta: dict) -> None:
  with open(os.path.join(directory, _META_FILE), "w", encoding="utf-8") as f:
    json.dump(meta, f, ensure_ascii=False)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
  """Loads a tokenizer saved by `.save(directory)`, whichever kind it is; a missing or damaged
  file is a DataError naming it."""
  path = os.path.join(directory, _META_FILE)
  if not os.path.exists(path):
    raise DataError(f"no tokenizer in {directory!s}: {_META_FILE} is missing")
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except ValueError as e:  # not JSON, or not UTF-8
    raise DataError(
      f"{path}: not a tokenizer description ({e}); save the tokenizer again"
    ) from None
  if isinstance(meta, dict) and meta.get("kind") == SentencePieceTokenizer.kind:
    model = os.path.join(directory, str(meta.get("model_file")))
    try:
      with open(model, "rb") as f:
        return _sentencepiece(f.read(), model)
    except OSError as e:
      raise DataError(f"{path}: its model_file cannot be read ({e})") from None
  return tokenizer_from_json(meta, where=path)


def tokenizer_to_json(tok: Tokenizer) -> dict:
  """The whole tokenizer as JSON data: a checkpoint carries it next to the weights."""
  if hasattr(tok, "to_json"):  # a Hugging Face tokenizer
    return tok.to_json()
  if isinstance(tok, SentencePieceTokenizer):
    return {
      "kind": tok.kind,
      "model_proto_base64": base64.b64encode(tok.model_proto).decode("ascii"),
    }
  return {"kind": tok.kind, "chars": tok.chars}


def tokenizer_from_json(data: dict, where: str = "tokenizer data") -> Tokenizer:
  """Inverse of tokenizer_to_json; `where` names the source in errors."""
  if not isinstance(data, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
  if data.get("kind") == SentencePieceTokenizer.kind:
    try:
      proto = base64.b64decode(data["model_proto_base64"], validate=True)
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"{where}: no readable model_proto_base64 ({e!r})") from None
    return _sentencepiece(proto, where)
  if data.get("kind") == CharTokenizer.kind:
    chars = data.get("chars")
    if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
      raise DataError(f"{where}: field 'chars' must be a list of single characters")
    return CharTokenizer(chars)
  if data.get("kind") == "hf":
    from data import hf_tokenizer

    return hf_tokenizer.from_json(data, where)
  raise DataError(f"{where}: unknown tokenizer kind {data.get('kind')!r}")


def _sentencepiece(model_proto: bytes, where: str) -> SentencePieceTokenizer:
  try:
    return SentencePieceTokenizer(model_proto)
  except RuntimeError as e:  # sentencepiece's parser: "Internal: ... ParseFromArray"
    raise DataError(f"{where}: not a sentencepiece model ({e})") from None


def _lines(texts_or_files: Iterable[str] | str, max_line_bytes: int) -> Iterator[str]:
  """Yields training lines: sentencepiece learns from lines, not whole documents."""
  if isinstance(texts_or_files, (str, os.PathLike)):
    texts_or_files = [texts_or_files]
  for item in texts_or_files:
    if isinstance(item, os.PathLike) or (
      isinstance(item, str) and "\n" not in item and os.path.isfile(item)
    ):
      with open(item, encoding="utf-8") as f:
        text = f.read()
    else:
      text = item
    for line in text.split("\n"):
      if line.strip():
        # Longer lines are skipped by the trainer; cut them so nothing is lost.
        for i in range(0, len(line), max_line_bytes // 4):
          yield line[i : i + max_line_bytes // 4]


def train_sentencepiece(
  texts_or_files: Iterable[str] | str,
  *,
  vocab_size: int,
  model_type: str = "bpe",
  byte_fallback: bool = True,
  character_coverage: float = 0.9995,
  input_sentence_size: int = 2_000_000,
  num_threads: int = 2,
) -> SentencePieceTokenizer:
  """Trains sentencepiece in memory from strings or file paths (no temp files).

  Args:
    texts_or_files: documents as strings, or paths of text files (a single path is allowed).
    vocab_size: total vocabulary including specials, roles and (with byte_fallback) 256 bytes.
    model_type: "bpe" or "unigram".
    byte_fallback: unknown characters become byte tokens, so every string round-trips.
  """
  if model_type not in ("bpe", "unigram"):
    raise DataError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  max_line = 16384
  lines = _lines(texts_or_files, max_line)
  try:
    first = next(lines)
  except StopIteration:
    raise DataError("train_sentencepiece got an empty corpus: no non-blank lines") from None

  def sentences():
    yield first
    yield from lines

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=sentences(),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      byte_fallback=byte_fallback,
      character_coverage=character_coverage,
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=3,
      unk_piece="<unk>",
      bos_piece=SPECIAL_PIECES["bos"],
      eos_piece=SPECIAL_PIECES["eos"],
      pad_piece=SPECIAL_PIECES["pad"],
      user_defined_symbols=[*ROLE_TOKENS.values(), END_TOKEN],
      # Identity normalisation and kept whitespace make decode(encode(s)) == s.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      # Without a dummy prefix, encode(a) + encode(b) decodes to a + b (chat templates rely on it).
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      max_sentence_length=max_line,
      input_sentence_size=input_sentence_size,
      shuffle_input_sentence=True,
      num_threads=num_threads,
      minloglevel=2,
    )
  except RuntimeError as e:  # sentencepiece reports bad settings from deep in its C++ trainer
    raise DataError(
      f"sentencepiece could not train a {model_type} vocabulary of "
      f"vocab_size={vocab_size}: {str(e).split('] ')[-1]}"
    ) from None
  return SentencePieceTokenizer(model.getvalue())
