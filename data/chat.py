"""Chat template and the SFT, preference and rollout-prompt batches built on it."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from data.arrays import array_iterator
from data.pipeline import BatchIterator
from data.sources import DataError, Messages, Preference
from data.tokenizer import END_TOKEN, ROLE_TOKENS, Tokenizer

OVERFLOW = ("truncate", "drop")
# What render_chat writes, saved with every chat checkpoint so that a checkpoint says how to
# talk to it.
CHAT_TEMPLATE = {"kind": "fromscratch", "roles": dict(ROLE_TOKENS), "end": END_TOKEN}


def template_item(tokenizer: Tokenizer) -> dict:
  """The chat_template item of a checkpoint: ours, or the Jinja source of the checkpoint's
  own template that the tokenizer renders with."""
  template = getattr(tokenizer, "chat_template", None)
  return CHAT_TEMPLATE if template is None else {"kind": "jinja", "source": template.source}


def render_chat(
  tokenizer: Tokenizer, messages: Messages, *, bos: bool = True
) -> tuple[list[int], list[int]]:
  """The ids of a chat and the SFT mask, 1 on what the assistant wrote. A tokenizer with its
  checkpoint's chat template (a Hugging Face one) renders through that template, the mask on
  each assistant turn's span; ours render [bos] then <|role|> content <|end|> per message,
  the mask on assistant content and its <|end|>."""
  template = getattr(tokenizer, "chat_template", None)
  if template is not None:
    return tokenizer.encode_spans(*template.assistant_spans(messages))
  ids = [tokenizer.bos_id] if bos else []
  mask = [0] * len(ids)
  for m in messages:
    if m["role"] not in tokenizer.role_ids:
      raise DataError(
        f"unknown chat role {m['role']!r}; expected one of {sorted(tokenizer.role_ids)}"
      )
    content = tokenizer.encode(m["content"])
    trained = int(m["role"] == "assistant")
    ids += [tokenizer.role_ids[m["role"]], *content, tokenizer.end_id]
    mask += [0] + [trained] * (len(content) + 1)
  return ids, mask


def render_prompt(tokenizer: Tokenizer, messages: Messages) -> list[int]:
  """The conversation so far plus the assistant's cue (<|assistant|>, or the template's
  generation prompt): what a sampler continues, the same tokens as in SFT."""
  template = getattr(tokenizer, "chat_template", None)
  if template is not None:
    text, _ = template.render(messages, add_generation_prompt=True)
    return tokenizer.encode(text)
  ids, _ = render_chat(tokenizer, messages)
  return ids + [tokenizer.role_ids["assistant"]]


def render_reply(
  tokenizer: Tokenizer, messages: Messages, reply: str
) -> tuple[list[int], list[int]]:
  """A prompt's conversation answered with `reply`: ids, and a mask that is 1 on the reply
  (through its end-of-turn token)."""
  if getattr(tokenizer, "chat_template", None) is not None:
    return render_chat(tokenizer, [*messages, {"role": "assistant", "content": reply}])
  prompt = render_prompt(tokenizer, messages)
  ids = prompt + tokenizer.encode(reply) + [tokenizer.end_id]
  return ids, [0] * len(prompt) + [1] * (len(ids) - len(prompt))


class OverflowCounter:
  """Counts sequences cut or dropped for length and reports them, so none vanish silently."""

  def __init__(self, what: str, limit: int, overflow: str):
    if overflow not in OVERFLOW:
      raise DataError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    self.what, self.limit, self.overflow = what, limit, overflow
    self.stats = {"examples": 0, "kept": 0, "truncated": 0, "dropped": 0}

  def report(self) -> dict[str, int]:
    s = self.stats
    if s["truncated"] or s["dropped"]:
      logging.warning(
        "%s: %d of %d sequences longer than %d tokens: %d truncated, %d dropped",
        self.what,
        s["truncated"] + s["dropped"],
        s["examples"],
        self.limit,
        s["truncated"],
        s["dropped"],
      )
    if s["kept"] == 0:
      raise DataError(
        f"{self.what}: no examples left ({s}); empty input or every sequence too long"
      )
    return dict(s)


def _shifted(
  ids: Sequence[int], mask: Sequence[int], length: int, pad_id: int
) -> dict[str, np.ndarray]:
  """One right-padded row: inputs ids[:-1], targets ids[1:], loss where the target is trained."""
  n = len(ids) - 1
  row = {
    "inputs": np.full(length, pad_id, np.int32),
    "targets": np.full(length, pad_id, np.int32),
    "segment_ids": np.zeros(length, np.int32),
    "positions": np.zeros(length, np.int32),
    "loss_mask": np.zeros(length, np.float32),
  }
  row["inputs"][:n], row["targets"][:n] = ids[:-1], ids[1:]
  row["segment_ids"][:n], row["positions"][:n], row["loss_mask"][:n] = 1, np.arange(n), mask[1:]
  return row


def pack_sft(
  examples: Iterable[Messages],
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  overflow: str = "truncate",
  pack: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Tokenizes chats and packs them greedily, in order, into (R, seq_len) rows; returns (arrays, stats).

  An example never straddles two rows; each gets its own segment id, so packing changes no loss.
  """
  counter = OverflowCounter("SFT", seq_len + 1, overflow)
  rows: list[list[dict[str, np.ndarray]]] = []
  used = seq_len + 1  # forces a new row for the first example
  for messages in examples:
    counter.stats["examples"] += 1
    ids, mask = render_chat(tokenizer, messages)
    if len(ids) > seq_len + 1:
      if overflow == "drop" or not any(mask[1 : seq_len + 1]):
        counter.stats["dropped"] += 1
        continue
      ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
      counter.stats["truncated"] += 1
    counter.stats["kept"] += 1
    piece = _shifted(ids, mask, len(ids) - 1, tokenizer.pad_id)
    if not pack or used + len(ids) - 1 > seq_len:
      rows.append([])
      used = 0
    rows[-1].append(piece)
    used += len(ids) - 1
  stats = counter.report()
  arrays = {
    k: np.zeros((len(rows), seq_len), v.dtype) for k, v in _shifted([0, 0], [0, 0], 1, 0).items()
  }
  arrays["inputs"][:] = arrays["targets"][:] = tokenizer.pad_id
  for r, pieces in enumerate(rows):
    at = 0
    for seg, piece in enumerate(pieces, start=1):
      n = len(piece["inputs"])
      for k, v in piece.items():
        arrays[k][r, at : at + n] = v
      arrays["segment_ids"][r, at : at + n] = seg
      at += n
  stats["rows"] = len(rows)
  return arrays, stats


def _unshifted(ids: Sequence[int], length: int, pad_id: int) -> dict[str, np.ndarray]:
  """One right-padded row holding the whole sequence, for a model that reads a value at the
  last real token (segment_ids > 0) rather than predicting the next one."""
  n = len(ids)
  row = {
    "inputs": np.full(length, pad_id, np.int32),
    "segment_ids": np.zeros(length, np.int32),
    "positions": np.zeros(length, np.int32),
  }
  row["inputs"][:n], row["segment_ids"][:n], row["positions"][:n] = ids, 1, np.arange(n)
  return row


def pack_preferences(
  pairs: Iterable[Preference],
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  overflow: str = "truncate",
  shift: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """One row per pair: chosen_* and rejected_* keys share a prompt; returns (arrays, stats).

  shift=True (LM losses such as DPO's): {inputs, targets, segment_ids, positions, loss_mask}
  per side, inputs ids[:-1], loss on response tokens only. shift=False (a reward model):
  {inputs, segment_ids, positions} per side, inputs the whole sequence through the response's
  <|end|>, plus `margin` (R,), each pair's margin. Truncation keeps the start of both
  sequences; a pair whose prompt leaves no room for a response token is dropped. Both are
  counted in the stats.
  """
  limit = seq_len + 1 if shift else seq_len  # tokens of one sequence a row holds
  counter = OverflowCounter("preferences", limit, overflow)
  rows: dict[str, list[np.ndarray]] = {}
  margins = []
  for pair in pairs:
    counter.stats["examples"] += 1
    sides = {
      side: render_reply(tokenizer, pair.prompt, response)
      for side, response in (("chosen", pair.chosen), ("rejected", pair.rejected))
    }
    prompt_len = max(mask.index(1) if 1 in mask else len(mask) for _, mask in sides.values())
    too_long = max(len(ids) for ids, _ in sides.values()) > limit
    if too_long and (overflow == "drop" or prompt_len >= limit):
      counter.stats["dropped"] += 1
      continue
    counter.stats["truncated"] += too_long
    counter.stats["kept"] += 1
    for side, (ids, mask) in sides.items():
      if shift:
        row = _shifted(ids[:limit], mask[:limit], seq_len, tokenizer.pad_id)
      else:
        row = _unshifted(ids[:limit], seq_len, tokenizer.pad_id)
      for k, v in row.items():
        rows.setdefault(f"{side}_{k}", []).append(v)
    margins.append(pair.margin)
  stats = counter.report()
  arrays = {k: np.stack(v) for k, v in rows.items()}
  if not shift:
    arrays["margin"] = np.asarray(margins, np.float32)
  return arrays, stats


def pack_prompts(
  records: Iterable[Mapping[str, Any]],
  tokenizer: Tokenizer,
  *,
  max_prompt_len: int,
  field: str = "prompt",
  overflow: str = "truncate",
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Left-padded prompt_tokens / prompt_mask (R, P) plus every other field carried as an array.

  A prompt is a string (one user turn) or a messages list. Truncation keeps the last tokens,
  since the end of a prompt (ending in <|assistant|>) is what a sampler continues.
  """
  counter = OverflowCounter("prompts", max_prompt_len, overflow)
  tokens, extras = [], {}
  for i, rec in enumerate(records):
    counter.stats["examples"] += 1
    if field not in rec:
      raise DataError(f"prompt record {i} has no field {field!r} (fields: {sorted(rec)})")
    prompt = rec[field]
    valid = isinstance(prompt, str) or (
      isinstance(prompt, list)
      and all(isinstance(m, Mapping) and {"role", "content"} <= set(m) for m in prompt)
    )
    if not valid:
      raise DataError(
        f"prompt record {i}: field {field!r} must be a string or a list of "
        f"{{role, content}} messages, got {prompt!r:.80}"
      )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    ids = render_prompt(tokenizer, messages)
    if len(ids) > max_prompt_len:
      if overflow == "drop":
        counter.stats["dropped"] += 1
        continue
      ids = ids[-max_prompt_len:]
      counter.stats["truncated"] += 1
    counter.stats["kept"] += 1
    tokens.append(ids)
    for k, v in rec.items():
      if k != field:
        extras.setdefault(k, []).append(v)
  stats = counter.report()
  prompt_tokens = np.full((len(tokens), max_prompt_len), tokenizer.pad_id, np.int32)
  prompt_mask = np.zeros((len(tokens), max_prompt_len), np.int32)
  for r, ids in enumerate(tokens):
    prompt_tokens[r, max_prompt_len - len(ids) :] = ids
    prompt_mask[r, max_prompt_len - len(ids) :] = 1
  out = {"prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask}
  for k, values in extras.items():
    if len(values) != len(tokens):
      raise DataError(
        f"prompt field {k!r} is present in only {len(values)} of {len(tokens)} records"
      )
    # Uniform scalars become a typed array; anything else stays as Python objects, unconverted.
    uniform = len({type(v) for v in values}) == 1 and isinstance(values[0], (str, int, float, bool))
    out[k] = np.asarray(values) if uniform else np.array(values + [None], dtype=object)[:-1]
  return out, stats


def sft_iterator(
  examples: Iterable[Messages],
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  overflow: str = "truncate",
  pack: bool = True,
  **kwargs,
) -> BatchIterator:
  """SFT batches with the pretraining keys; loss_mask covers assistant content and <|end|> only."""
  arrays, stats = pack_sft(examples, tokenizer, seq_len=seq_len, overflow=overflow, pack=pack)
  return array_iterator(arrays, stats, kind="sft", batch_size=batch_size, seed=seed, **kwargs)


def preference_iterator(
  pairs: Iterable[Preference],
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  overflow: str = "truncate",
  shift: bool = True,
  **kwargs,
) -> BatchIterator:
  """Preference batches: chosen_* and rejected_* keys as `pack_preferences` makes them."""
  arrays, stats = pack_preferences(
    pairs, tokenizer, seq_len=seq_len, overflow=overflow, shift=shift
  )
  return array_iterator(
    arrays, stats, kind="preference", batch_size=batch_size, seed=seed, **kwargs
  )


def prompt_iterator(
  records: Iterable[Mapping[str, Any]],
  tokenizer: Tokenizer,
  *,
  max_prompt_len: int,
  batch_size: int,
  seed: int,
  field: str = "prompt",
  overflow: str = "truncate",
  **kwargs,
) -> BatchIterator:
  """Rollout prompt batches: left-padded prompt_tokens, prompt_mask and the records' other fields."""
  arrays, stats = pack_prompts(
    records, tokenizer, max_prompt_len=max_prompt_len, field=field, overflow=overflow
  )
  return array_iterator(arrays, stats, kind="prompts", batch_size=batch_size, seed=seed, **kwargs)
