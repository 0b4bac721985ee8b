"""Chat template, SFT loss mask, preference pairs, rollout prompts and length overflow."""

import json
import logging

import numpy as np
import pytest

from data import chat
from data.sources import DataError, Preference
from data.tokenizer import CharTokenizer

# User text is lowercase and assistant text uppercase, so a target's role is readable from its character.
USER_CHARS = "abcdefghij ?"
ASSISTANT_CHARS = "ABCDEFGHIJ!"


@pytest.fixture(scope="module")
def tok():
  return CharTokenizer.from_text(USER_CHARS + ASSISTANT_CHARS)


def _chat(k):
  msgs = [{"role": "system", "content": "be cafe"}] if k % 2 else []
  for t in range(1 + k % 3):
    msgs.append({"role": "user", "content": "abc def"[: 2 + (k + t) % 6]})
    msgs.append({"role": "assistant", "content": "ABCDEFG!"[: 1 + (k * t) % 8]})
  return msgs


def test_sft_loss_mask_is_exactly_the_assistant_tokens(tok):
  examples = [_chat(k) for k in range(12)]
  arrays, stats = chat.pack_sft(examples, tok, seq_len=48)
  assert stats == {
    "examples": 12,
    "kept": 12,
    "truncated": 0,
    "dropped": 0,
    "rows": len(arrays["inputs"]),
  }
  assert stats["rows"] < 12, "short chats should share rows"
  upper = {tok.encode(c)[0] for c in ASSISTANT_CHARS}
  total_trained = 0
  for r in range(len(arrays["inputs"])):
    role = None
    for i in range(48):
      seg = arrays["segment_ids"][r, i]
      if seg == 0:
        assert arrays["loss_mask"][r, i] == 0
        continue
      x, y = arrays["inputs"][r, i], arrays["targets"][r, i]
      if arrays["positions"][r, i] == 0:
        assert x == tok.bos_id and (i == 0 or arrays["segment_ids"][r, i - 1] != seg)
        role = None
      if x in tok.role_ids.values():
        role = x
      # Reference: trained iff the target is assistant text or the <|end|> closing an assistant turn.
      expected = y in upper or (y == tok.end_id and role == tok.role_ids["assistant"])
      assert arrays["loss_mask"][r, i] == expected, (r, i)
      total_trained += expected
  assert total_trained == sum(
    len(m["content"]) + 1 for ex in examples for m in ex if m["role"] == "assistant"
  )


def test_sft_rows_decode_to_the_template(tok):
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HI!"}]
  arrays, _ = chat.pack_sft([msgs], tok, seq_len=12, pack=False)
  n = int((arrays["segment_ids"][0] > 0).sum())
  ids = [*arrays["inputs"][0, :n], arrays["targets"][0, n - 1]]
  assert tok.decode(ids) == "<|user|>hi<|end|><|assistant|>HI!<|end|>"
  assert ids[0] == tok.bos_id
  trained = arrays["targets"][0][arrays["loss_mask"][0] > 0]
  assert tok.decode(trained) == "HI!<|end|>"
  # The rollout prompt is exactly the SFT prefix that precedes the assistant's reply.
  assert chat.render_prompt(tok, msgs[:1]) == ids[: ids.index(tok.role_ids["assistant"]) + 1]


def test_sft_iterator_batches_and_resumes(tok):
  examples = [_chat(k) for k in range(40)]
  it = chat.sft_iterator(
    examples, tok, seq_len=32, batch_size=2, seed=1, process_index=0, process_count=1
  )
  first = [next(it) for _ in range(3)]
  assert set(first[0]) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
  state = json.loads(json.dumps(it.get_state()))
  following = [next(it) for _ in range(5)]
  again = chat.sft_iterator(
    examples, tok, seq_len=32, batch_size=2, seed=1, process_index=0, process_count=1
  )
  again.set_state(state)
  for want in following:
    got = next(again)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_overlong_sft_is_truncated_or_dropped_and_counted(tok, caplog):
  long = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "ABCDEFGHIJ" * 3}]
  short = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "B"}]
  with caplog.at_level(logging.WARNING):
    arrays, stats = chat.pack_sft([long, short], tok, seq_len=16, overflow="truncate")
  assert (stats["truncated"], stats["dropped"], stats["kept"]) == (1, 0, 2)
  assert "1 truncated, 0 dropped" in caplog.text
  assert arrays["segment_ids"][0].min() == 1, "the truncated example fills its row"
  _, stats = chat.pack_sft([long, short], tok, seq_len=16, overflow="drop")
  assert (stats["truncated"], stats["dropped"], stats["kept"]) == (0, 1, 1)
  with pytest.raises(DataError, match="no examples left"):
    chat.pack_sft([long], tok, seq_len=16, overflow="drop")
  with pytest.raises(DataError, match="no examples left"):
    chat.pack_sft([], tok, seq_len=16)
  with pytest.raises(DataError, match="overflow must be one of"):
    chat.pack_sft([short], tok, seq_len=16, overflow="wrap")


def test_preference_pairs_share_the_prompt_and_mask_responses(tok):
  pairs = [
    Preference([{"role": "user", "content": "hi ab"}], "ABC", "DEFGHI!"),
    Preference([{"role": "system", "content": "be"}, {"role": "user", "content": "j"}], "J", ""),
  ]
  arrays, stats = chat.pack_preferences(pairs, tok, seq_len=24)
  assert stats["kept"] == 2
  for i, pair in enumerate(pairs):
    prompt = chat.render_prompt(tok, pair.prompt)
    n = len(prompt) - 1
    assert (
      arrays["chosen_inputs"][i, :n].tolist()
      == arrays["rejected_inputs"][i, :n].tolist()
      == prompt[:-1]
    )
    for side, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
      mask = arrays[f"{side}_loss_mask"][i]
      assert tok.decode(arrays[f"{side}_targets"][i][mask > 0]) == response + "<|end|>"
      assert mask[: n - 1].sum() == 0
      assert arrays[f"{side}_segment_ids"][i].sum() == len(prompt) + len(response)
  assert set(arrays) == {
    f"{s}_{k}"
    for s in ("chosen", "rejected")
    for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")
  }


def test_overlong_preferences_are_counted(tok):
  pairs = [
    Preference([{"role": "user", "content": "a"}], "ABCDEFGHIJ" * 2, "B"),
    Preference([{"role": "user", "content": "b"}], "C", "D"),
  ]
  arrays, stats = chat.pack_preferences(pairs, tok, seq_len=10)
  assert (stats["truncated"], stats["kept"]) == (1, 2)
  prompt = chat.render_prompt(tok, pairs[0].prompt)
  assert arrays["chosen_loss_mask"][0].sum() == 10 + 1 - len(prompt), (
    "truncation keeps the response's start"
  )
  assert tok.decode(arrays["chosen_targets"][0][arrays["chosen_loss_mask"][0] > 0]) == "ABCDEF"
  _, stats = chat.pack_preferences(pairs, tok, seq_len=10, overflow="drop")
  assert (stats["dropped"], stats["kept"]) == (1, 1)


def test_unshifted_preference_rows_hold_the_whole_sequence_and_margins(tok):
  """shift=False (the reward model's rows): each side's inputs are the whole rendered
  sequence, so its last real token (plain-Python index of the last segment id > 0) is the
  response's <|end|>; margins ride along per pair."""
  pairs = [
    Preference([{"role": "user", "content": "hi ab"}], "ABC", "DEFGHI!", margin=1.5),
    Preference([{"role": "system", "content": "be"}, {"role": "user", "content": "j"}], "J", ""),
  ]
  arrays, stats = chat.pack_preferences(pairs, tok, seq_len=24, shift=False)
  assert stats["kept"] == 2
  assert set(arrays) == {
    f"{s}_{k}" for s in ("chosen", "rejected") for k in ("inputs", "segment_ids", "positions")
  } | {"margin"}
  assert arrays["margin"].tolist() == [1.5, 0.0] and arrays["margin"].dtype == np.float32
  for i, pair in enumerate(pairs):
    for side, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
      ids = chat.render_prompt(tok, pair.prompt) + tok.encode(response) + [tok.end_id]
      seg = arrays[f"{side}_segment_ids"][i].tolist()
      last = max(j for j, s in enumerate(seg) if s > 0)
      assert last == len(ids) - 1 and arrays[f"{side}_inputs"][i, last] == tok.end_id
      assert arrays[f"{side}_inputs"][i, : len(ids)].tolist() == ids
      assert (arrays[f"{side}_inputs"][i, len(ids) :] == tok.pad_id).all()
      assert arrays[f"{side}_positions"][i, : len(ids)].tolist() == list(range(len(ids)))


def test_unshifted_overlong_pairs_are_dropped_or_truncated_and_counted(tok):
  """A row holds seq_len tokens: a pair of exactly seq_len fits, one token more is over-long
  (dropped, or cut to its first seq_len tokens), and a prompt that fills the row leaves no
  response to score (dropped either way)."""
  prompt = [{"role": "user", "content": "ab"}]  # <bos><|user|>ab<|end|><|assistant|>: 6 ids
  fits = Preference(prompt, "ABC", "D")  # 6 + 3 + 1 = 10 ids
  over = Preference(prompt, "ABCD", "D")  # 11 ids
  full = Preference([{"role": "user", "content": "abcdef"}], "A", "B")  # a 10-id prompt
  arrays, stats = chat.pack_preferences([fits, over, full], tok, seq_len=10, shift=False)
  assert (stats["kept"], stats["truncated"], stats["dropped"]) == (2, 1, 1)
  cut = chat.render_prompt(tok, prompt) + tok.encode("ABCD")
  assert arrays["chosen_inputs"][1].tolist() == cut[:10], "truncation keeps the start"
  assert arrays["chosen_segment_ids"][1].min() == 1
  assert arrays["chosen_inputs"][0, 9] == tok.end_id
  arrays, stats = chat.pack_preferences(
    [fits, over, full], tok, seq_len=10, overflow="drop", shift=False
  )
  assert (stats["kept"], stats["truncated"], stats["dropped"]) == (1, 0, 2)
  assert arrays["margin"].shape == (1,)


def test_preference_margins_are_read_from_jsonl(tmp_path):
  """An optional number "margin" per record (default 0), in both record shapes; anything
  else is an error naming the file and line."""
  from data import sources

  hh = {
    "chosen": "\n\nHuman: hi\n\nAssistant: Hello.",
    "rejected": "\n\nHuman: hi\n\nAssistant: Go.",
  }
  path = tmp_path / "p.jsonl"
  rows = [
    {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2},
    {"prompt": "q", "chosen": "a", "rejected": "b"},
    {**hh, "margin": -0.5},
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert [p.margin for p in sources.read_preferences(path)] == [2.0, 0.0, -0.5]
  for bad in ("1", True, None):
    path.write_text(json.dumps(rows[1]) + "\n" + json.dumps({**rows[1], "margin": bad}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: field 'margin' must be a finite number"):
      list(sources.read_preferences(path))


def test_prompt_batches_are_left_padded_and_carry_fields(tok):
  records = [
    {"prompt": "abc", "answer": "A"},
    {"prompt": "a", "answer": "B"},
    {"prompt": "abcdefghij abcdefghij", "answer": "C"},
  ]
  arrays, stats = chat.pack_prompts(records, tok, max_prompt_len=10)
  assert stats["truncated"] == 1
  for i, rec in enumerate(records):
    ids = chat.render_prompt(tok, [{"role": "user", "content": rec["prompt"]}])[-10:]
    row, mask = arrays["prompt_tokens"][i], arrays["prompt_mask"][i]
    assert row[10 - len(ids) :].tolist() == ids and mask[10 - len(ids) :].all()
    assert (row[: 10 - len(ids)] == tok.pad_id).all() and not mask[: 10 - len(ids)].any()
  assert arrays["answer"].tolist() == ["A", "B", "C"]
  it = chat.prompt_iterator(
    records,
    tok,
    max_prompt_len=10,
    batch_size=2,
    seed=0,
    shuffle=False,
    process_index=0,
    process_count=1,
    overflow="drop",
  )
  assert it.stats["dropped"] == 1
  batch = next(it)
  assert batch["answer"].tolist() == ["A", "B"] and batch["prompt_tokens"].shape == (2, 10)
  with pytest.raises(DataError, match="cannot fill one batch"):
    chat.prompt_iterator(
      records,
      tok,
      max_prompt_len=10,
      batch_size=3,
      seed=0,
      process_index=0,
      process_count=1,
      overflow="drop",
    )


def test_bad_prompt_records_name_the_record_and_field():
  from data.chat import pack_prompts
  from data.tokenizer import CharTokenizer

  tok = CharTokenizer.from_text("abc ?")
  with pytest.raises(DataError, match=r"record 1 has no field 'prompt'"):
    pack_prompts([{"prompt": "a"}, {"question": "b"}], tok, max_prompt_len=8)
  with pytest.raises(DataError, match=r"record 0: field 'prompt' must be a string"):
    pack_prompts([{"prompt": 3}], tok, max_prompt_len=8)
