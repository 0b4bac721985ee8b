"""Sources: the built-in plays, tinyshakespeare split, JSONL shapes and bad-input errors."""

import json

import pytest

from data import sources
from data.sources import DataError


def test_builtin_plays_split_by_play():
  all_plays = dict(sources.shakespeare_plays("all"))
  train = dict(sources.shakespeare_plays("train"))
  val = dict(sources.shakespeare_plays("val"))
  assert len(all_plays) == 38
  assert val and train and not set(train) & set(val)
  assert set(train) | set(val) == set(all_plays)
  # Golden: every 8th play by sorted path is held out.
  assert sorted(val) == sorted(
    ["two-gentlemen-of-verona", "henry-viii", "troilus-and-cressida", "the-tempest"]
  ), (
    "the built-in corpus's validation plays changed: every run's validation set changes "
    "with them, so validation losses stop being comparable with earlier runs"
  )
  assert list(sources.builtin_corpus("val")) == list(val.values())


def test_play_markdown_is_stripped_but_readable():
  dream = dict(sources.shakespeare_plays("all"))["a-midsummer-night-s-dream"]
  for mark in ("**", "#", "_", "\\", "  \n"):
    assert mark not in dream, f"markdown {mark!r} left in the text"
  assert dream.startswith("A Midsummer Night's Dream\n\nACT I\n")
  # Speaker name on its own line, followed by the speech.
  assert "\n\nTHESEUS\nNow, fair Hippolyta, our nuptial hour\nDraws on apace;" in dream
  assert "\n\nEnter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants\n\n" in dream


def test_strip_play_markdown_cases():
  md = "# Title\n\n## ACT I\n\n**ALL & ONE**  \nLine one,  \n\\--line two.\n\n_\\[Aside]_  \n_Exit\nall_\n\n\n"
  assert (
    sources.strip_play_markdown(md)
    == "Title\n\nACT I\n\nALL & ONE\nLine one,\n--line two.\n\n[Aside]\nExit\nall\n"
  )


def test_tinyshakespeare_split_is_nanogpt_90_10(tmp_path):
  text = "".join(chr(97 + i % 26) for i in range(1003))
  path = tmp_path / "input.txt"
  path.write_text(text)
  n = len(text)
  assert sources.tinyshakespeare("train", str(path)) == text[: int(n * 0.9)]
  assert sources.tinyshakespeare("val", str(path)) == text[int(n * 0.9) :]


def _write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def test_text_files_from_dirs_and_globs(tmp_path):
  (tmp_path / "d" / "sub").mkdir(parents=True)
  (tmp_path / "d" / "b.txt").write_text("bee")
  (tmp_path / "d" / "sub" / "a.txt").write_text("ay")
  (tmp_path / "d" / "skip.md").write_text("no")
  assert sorted(sources.read_text_files(tmp_path / "d")) == ["ay", "bee"]
  assert list(sources.read_text_files(str(tmp_path / "d" / "*.txt"))) == ["bee"]
  with pytest.raises(DataError, match="no files match"):
    list(sources.read_text_files(str(tmp_path / "nothing*.txt")))


def test_jsonl_text_and_malformed_line_names_file_and_line(tmp_path):
  good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "a"}, "", {"text": "b", "id": 2}])
  assert list(sources.read_jsonl_text(good)) == ["a", "b"]
  bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": "c",'])
  with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
    list(sources.read_jsonl_text(bad))


def test_missing_field_names_field_file_and_line(tmp_path):
  path = _write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, {"body": "b"}])
  with pytest.raises(DataError, match=r"m\.jsonl:2: missing field 'text'"):
    list(sources.read_jsonl_text(path))
  pref = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a"}])
  with pytest.raises(DataError, match=r"p\.jsonl:1: missing field 'rejected'"):
    list(sources.read_preferences(pref))


def test_wrong_json_shapes_name_file_line_and_type(tmp_path):
  path = _write_jsonl(tmp_path / "list.jsonl", [{"text": "a"}, '["not", "an", "object"]'])
  with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object, got list"):
    list(sources.read_jsonl_text(path))
  path = _write_jsonl(tmp_path / "num.jsonl", [{"text": 7}])
  with pytest.raises(DataError, match=r"num\.jsonl:1: field 'text' must be str, got int"):
    list(sources.read_jsonl_text(path))


def test_hh_transcript_must_open_with_a_human_turn():
  with pytest.raises(DataError, match=r"HH transcript must start with '\\n\\nHuman:'"):
    sources.hh_to_messages("Assistant: hello\n\nHuman: hi")
  assert sources.hh_to_messages("\n\nHuman: hi\n\nAssistant: hello") == [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
  ]


def test_chat_shapes(tmp_path):
  path = _write_jsonl(
    tmp_path / "c.jsonl",
    [
      {
        "messages": [
          {"role": "system", "content": "s"},
          {"role": "user", "content": "u"},
          {"role": "assistant", "content": "a"},
        ]
      },
      {"prompt": "p", "response": "r"},
    ],
  )
  assert list(sources.read_chat(path)) == [
    [
      {"role": "system", "content": "s"},
      {"role": "user", "content": "u"},
      {"role": "assistant", "content": "a"},
    ],
    [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}],
  ]
  bad = _write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
  with pytest.raises(DataError, match=r"r\.jsonl:1: messages\[0\]: unknown role 'robot'"):
    list(sources.read_chat(bad))


def test_hh_transcripts_split_into_prompt_chosen_rejected(tmp_path):
  prompt = (
    "\n\nHuman: What is a sonnet?\n\nAssistant: A poem.\n\nHuman: How many lines?\n\nAssistant:"
  )
  chosen, rejected = prompt + " Fourteen lines.", prompt + " About twenty, I think."
  assert sources.split_hh(chosen, rejected) == (
    prompt,
    " Fourteen lines.",
    " About twenty, I think.",
  )
  # Responses that begin alike must not pull their shared start into the prompt.
  assert sources.split_hh(prompt + " Four", prompt + " Fourteen") == (prompt, " Four", " Fourteen")
  path = _write_jsonl(
    tmp_path / "hh.jsonl",
    [
      {"chosen": chosen, "rejected": rejected},
      {"prompt": "Say hi", "chosen": "Hi", "rejected": "No"},
    ],
  )
  first, second = sources.read_preferences(path)
  assert first.prompt == [
    {"role": "user", "content": "What is a sonnet?"},
    {"role": "assistant", "content": "A poem."},
    {"role": "user", "content": "How many lines?"},
  ]
  assert (first.chosen, first.rejected) == ("Fourteen lines.", "About twenty, I think.")
  assert second == sources.Preference([{"role": "user", "content": "Say hi"}], "Hi", "No")
  bad = _write_jsonl(tmp_path / "hh_bad.jsonl", [{"chosen": "x\n\nHuman: a", "rejected": "y"}])
  with pytest.raises(DataError, match=r"hh_bad\.jsonl:1: .*share no prefix"):
    list(sources.read_preferences(bad))


def test_prompts_carry_extra_fields(tmp_path):
  path = _write_jsonl(
    tmp_path / "rl.jsonl", [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}]
  )
  assert list(sources.read_prompts(path)) == [
    {"prompt": "2+2?", "answer": "4"},
    {"prompt": "3+3?", "answer": "6"},
  ]


def test_gzipped_jsonl_and_text_read_as_the_plain_files(tmp_path):
  """.jsonl.gz and .txt.gz (as the Anthropic HH files ship) read exactly as their plain
  originals, alone, in a directory and by glob; CRLF reads as text mode reads it."""
  import gzip

  prompt = "\n\nHuman: Hi there\n\nAssistant:"
  rows = [{"chosen": prompt + " Hello.", "rejected": prompt + " Go away."}] * 3
  plain = _write_jsonl(tmp_path / "hh.jsonl", rows)
  (tmp_path / "gz").mkdir()
  packed = tmp_path / "gz" / "hh.jsonl.gz"
  with open(plain, "rb") as f, gzip.open(packed, "wb") as g:
    g.write(f.read())
  want = list(sources.read_preferences(plain))
  assert len(want) == 3
  assert list(sources.read_preferences(packed)) == want
  assert list(sources.read_preferences(tmp_path / "gz")) == want
  assert list(sources.read_preferences(str(tmp_path / "gz" / "*.gz"))) == want
  text = "line one\r\nline two é\n"
  (tmp_path / "plain.txt").write_bytes(text.encode())
  with gzip.open(tmp_path / "gz" / "doc.txt.gz", "wb") as g:
    g.write(text.encode())
  with open(tmp_path / "plain.txt", encoding="utf-8") as f:
    as_text_mode = f.read()
  assert list(sources.read_text_files(tmp_path / "plain.txt")) == [as_text_mode]
  assert list(sources.read_text_files(tmp_path / "gz")) == [as_text_mode]


def test_bytes_that_are_not_utf8_and_broken_gzip_name_the_file(tmp_path):
  """A Latin-1 file (text or JSONL) is a DataError naming the file and line, never a bare
  UnicodeDecodeError; a truncated .gz names the file."""
  import gzip

  (tmp_path / "latin.txt").write_bytes("first\nsecond caf\xe9\n".encode("latin-1"))
  with pytest.raises(DataError, match=r"latin\.txt:2: .*not UTF-8"):
    list(sources.read_text_files(tmp_path / "latin.txt"))
  (tmp_path / "latin.jsonl").write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(DataError, match=r"latin\.jsonl:2: .*not UTF-8"):
    list(sources.read_jsonl_text(tmp_path / "latin.jsonl"))
  (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
  with pytest.raises(DataError, match=r"binary\.txt:2: .*not UTF-8"):  # byte 10 ends line 1
    list(sources.read_text_files(tmp_path / "binary.txt"))
  whole = gzip.compress(b'{"text": "a"}\n' * 100)
  (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
  with pytest.raises(DataError, match=r"cut\.jsonl\.gz: not a whole gzip file"):
    list(sources.read_jsonl_text(tmp_path / "cut.jsonl.gz"))
  (tmp_path / "fake.txt.gz").write_bytes(b"plain text, not gzip")
  with pytest.raises(DataError, match=r"fake\.txt\.gz: not a whole gzip file"):
    list(sources.read_text_files(tmp_path / "fake.txt.gz"))
