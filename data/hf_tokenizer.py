"""A Hugging Face tokenizer (tokenizer.json: byte-level BPE and the rest, through the
`tokenizers` library) behind the same interface as ours, with the checkpoint's special tokens
and chat template (tokenizer_config.json)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from data.chat_template import ChatTemplate
from data.sources import DataError
from data.tokenizer import UNKNOWN, _Specials

SPECIALS = ("bos", "eos", "pad", "unk")
# What a checkpoint keeps of tokenizer_config.json: the special tokens and the chat template.
KEPT = tuple(f"{s}_token" for s in SPECIALS) + ("chat_template",)


def _content(token) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  if isinstance(token, dict):
    return token.get("content")
  return token if isinstance(token, str) else None


class HFTokenizer(_Specials):
  """`tokenizer_json`: the text of a tokenizer.json; `config`: tokenizer_config.json's special
  tokens (bos_token, eos_token, pad_token, unk_token, as strings or AddedToken dicts) and
  chat_template. Without a pad token, padding uses eos; without bos, none is added. The end
  of an assistant turn (what sampling stops at) is eos, as in the checkpoints' own configs."""

  kind = "hf"

  def __init__(
    self,
    tokenizer_json: str,
    config: dict,
    where: str = "tokenizer.json",
    token_ids: dict | None = None,
  ):
    """`token_ids`: config.json's bos/eos/pad_token_id, for the specials `config` names none."""
    from tokenizers import Tokenizer

    try:
      self._tok = Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the Rust parser raises its own exception type
      raise DataError(f"{where}: not a Hugging Face tokenizer.json ({e})") from None
    self.tokenizer_json, self.where = tokenizer_json, where
    config = {k: v for k, v in config.items() if v is not None}
    for name in SPECIALS:
      i = (token_ids or {}).get(f"{name}_token_id")
      i = i[0] if isinstance(i, list) and i else i
      if f"{name}_token" not in config and isinstance(i, int) and self._tok.id_to_token(i):
        config[f"{name}_token"] = self._tok.id_to_token(i)
    self.config = {k: v for k, v in config.items() if k in KEPT}
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.tokens: dict[str, str] = {}
    ids: dict[str, int | None] = {}
    for name in SPECIALS:
      token = _content(self.config.get(f"{name}_token"))
      ids[name] = None if token is None else self._tok.token_to_id(token)
      if token is not None and ids[name] is None:
        raise DataError(f"{where}: {name}_token {token!r} is not in the vocabulary")
      if token is not None:
        self.tokens[f"{name}_token"] = token
    if ids["eos"] is None:
      raise DataError(f"{where}: no eos_token; set it in tokenizer_config.json")
    self.bos_id, self.eos_id = ids["bos"], ids["eos"]
    self.pad_id = ids["pad"] if ids["pad"] is not None else ids["eos"]
    self.end_id = self.eos_id
    self.role_ids: dict[str, int] = {}  # no role tokens: the chat template renders chats
    template = self.config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      template = named.get("default")
    self.chat_template = (
      ChatTemplate(template, self.tokens, where=f"{where} chat_template") if template else None
    )

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    head = [self.bos_id] if bos and self.bos_id is not None else []
    return head + ids + ([self.eos_id] if eos else [])

  def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False):
    head = [self.bos_id] if bos and self.bos_id is not None else []
    tail = [self.eos_id] if eos else []
    out = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [head + e.ids + tail for e in out]

  def encode_spans(
    self, text: str, spans: Sequence[tuple[int, int]]
  ) -> tuple[list[int], list[int]]:
    """`text`'s ids, and a mask that is 1 on the tokens of each character span (each token
    that holds a character of it), as transformers' assistant masks are."""
    enc = self._tok.encode(text, add_special_tokens=False)
    mask = [0] * len(enc.ids)
    for start, end in spans:
      if end <= start:
        continue
      first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
      first = first if first is not None else 0
      last = last if last is not None else len(mask) - 1
      mask[first : last + 1] = [1] * (last + 1 - first)
    return enc.ids, mask

  def decode(self, ids: Sequence[int]) -> str:
    skip = {self.pad_id} - {self.eos_id}  # a pad that is eos shows as eos does
    ids = [int(i) for i in ids if int(i) not in skip]
    if any(not 0 <= i < self.vocab_size for i in ids):  # a model vocabulary padded past ours
      parts, run = [], []
      for i in ids:
        if 0 <= i < self.vocab_size:
          run.append(i)
        else:
          parts.append(self._tok.decode(run, skip_special_tokens=False) + UNKNOWN)
          run = []
      return "".join(parts) + self._tok.decode(run, skip_special_tokens=False)
    return self._tok.decode(ids, skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i)) or UNKNOWN

  def to_json(self) -> dict:
    return {"kind": self.kind, "tokenizer_json": self.tokenizer_json, "config": self.config}

  def save(self, directory: str | os.PathLike) -> None:
    from data.tokenizer import _write_meta

    os.makedirs(directory, exist_ok=True)
    _write_meta(directory, {**self.to_json(), "vocab_size": self.vocab_size})


def from_json(data: dict, where: str) -> HFTokenizer:
  if not isinstance(data.get("tokenizer_json"), str) or not isinstance(data.get("config"), dict):
    raise DataError(f"{where}: an 'hf' tokenizer needs 'tokenizer_json' (text) and 'config'")
  return HFTokenizer(data["tokenizer_json"], data["config"], where=where)


def load_hf_tokenizer(folder: str) -> HFTokenizer:
  """The tokenizer of a Hugging Face checkpoint folder: tokenizer.json, with the special
  tokens and chat template of tokenizer_config.json (and special_tokens_map.json), and bos
  and eos from config.json's ids where the tokenizer's config names none."""
  path = os.path.join(folder, "tokenizer.json")
  if not os.path.exists(path):
    raise DataError(
      f"{folder} has no tokenizer.json; only Hugging Face fast tokenizers (tokenizer.json) load"
    )
  with open(path, encoding="utf-8") as f:
    text = f.read()
  config: dict = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    extra = os.path.join(folder, name)
    if os.path.exists(extra):
      try:
        with open(extra, encoding="utf-8") as f:
          config.update({k: v for k, v in json.load(f).items() if v is not None})
      except ValueError as e:
        raise DataError(f"{extra}: not JSON ({e})") from None
  ids: dict = {}
  model_config = os.path.join(folder, "config.json")
  if os.path.exists(model_config):
    with open(model_config, encoding="utf-8") as f:
      ids = json.load(f)
  return HFTokenizer(text, config, where=path, token_ids=ids)
