"""Tokenizer round trips, special ids and save/load, against plain Python references."""

import json

import pytest

from data import sources
from data.sources import DataError
from data.tokenizer import (
  CharTokenizer,
  load_tokenizer,
  tokenizer_from_json,
  tokenizer_to_json,
  train_sentencepiece,
)


@pytest.fixture(scope="module")
def plays():
  return dict(sources.shakespeare_plays("all"))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_round_trip_on_builtin_corpus(plays, model_type, tmp_path):
  train = [plays["macbeth"], plays["the-tempest"]]
  tok = train_sentencepiece(train, vocab_size=1000, model_type=model_type)
  assert tok.vocab_size == 1000
  # Unseen plays round-trip exactly, whitespace and newlines included.
  for name in ("hamlet", "edward-iii"):
    text = plays[name]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2, (
      "a 1000-piece vocabulary should compress Shakespeare at least 2x"
    )
  odd = "  Café — naïve 🙂\n\n\tend "
  assert tok.decode(tok.encode(odd)) == odd, (
    "byte fallback must cover characters never seen in training"
  )
  texts = [plays["hamlet"][:500], "", odd]
  assert tok.encode_batch(texts, bos=True, eos=True) == [
    tok.encode(t, bos=True, eos=True) for t in texts
  ]
  assert tok.decode_batch(tok.encode_batch(texts)) == texts

  tok.save(tmp_path / "tok")
  again = load_tokenizer(tmp_path / "tok")
  assert type(again) is type(tok)
  assert again.encode(plays["hamlet"][:2000]) == tok.encode(plays["hamlet"][:2000])
  # As a checkpoint carries it: through JSON text and back.
  carried = tokenizer_from_json(json.loads(json.dumps(tokenizer_to_json(tok))))
  assert type(carried) is type(tok) and carried.model_proto == tok.model_proto
  assert carried.encode(plays["hamlet"][:2000]) == tok.encode(plays["hamlet"][:2000])


def _check_specials(tok):
  specials = [tok.bos_id, tok.eos_id, tok.pad_id, tok.end_id, *tok.role_ids.values()]
  assert len(set(specials)) == len(specials), f"special ids collide: {specials}"
  assert all(0 <= i < tok.vocab_size for i in specials)
  assert set(tok.role_ids) == {"system", "user", "assistant"}
  ids = tok.encode("hi", bos=True, eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  # pad is skipped by decode, bos/eos decode to nothing.
  assert tok.decode(ids + [tok.pad_id] * 3) == "hi"


def test_sentencepiece_specials_and_role_markers(plays):
  tok = train_sentencepiece([plays["macbeth"]], vocab_size=500)
  _check_specials(tok)
  for role, marker in [
    ("system", "<|system|>"),
    ("user", "<|user|>"),
    ("assistant", "<|assistant|>"),
  ]:
    assert tok.encode(marker) == [tok.role_ids[role]], f"{marker} must be a single token"
  assert tok.encode("<|end|>") == [tok.end_id]
  # Without a dummy prefix, concatenated encodings decode to the concatenated text.
  a, b = "To be, or not", " to be"
  assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b


def test_sentencepiece_from_files(tmp_path, plays):
  path = tmp_path / "a.txt"
  path.write_text(plays["othello"], encoding="utf-8")
  tok = train_sentencepiece(str(path), vocab_size=400)
  assert tok.decode(tok.encode(plays["othello"][:3000])) == plays["othello"][:3000]


def test_char_tokenizer_matches_nanogpt_ids_and_round_trips(tmp_path):
  text = "First Citizen:\nBefore we proceed, hear me speak.\n\nAll:\nSpeak, speak!\n"
  tok = CharTokenizer.from_text(text)
  # nanoGPT shakespeare_char: chars = sorted(list(set(data))); stoi = {ch: i}.
  chars = sorted(list(set(text)))
  stoi = {ch: i for i, ch in enumerate(chars)}
  assert tok.encode(text) == [stoi[c] for c in text]
  assert tok.vocab_size == len(chars) + 7
  assert min(tok.bos_id, tok.eos_id, tok.pad_id, tok.end_id, *tok.role_ids.values()) == len(chars)
  assert tok.decode(tok.encode(text)) == text
  _check_specials(tok)
  assert tok.decode([tok.role_ids["user"], stoi["h"], tok.end_id]) == "<|user|>h<|end|>"
  with pytest.raises(DataError, match="not in the CharTokenizer vocabulary"):
    tok.encode("xyz~")
  tok.save(tmp_path / "c")
  again = load_tokenizer(tmp_path / "c")
  assert isinstance(again, CharTokenizer) and again.encode(text) == tok.encode(text)
  carried = tokenizer_from_json(json.loads(json.dumps(tokenizer_to_json(tok))))
  assert isinstance(carried, CharTokenizer) and carried.encode(text) == tok.encode(text)
  with pytest.raises(DataError, match=r"ckpt/7/tokenizer: unknown tokenizer kind 'wordpiece'"):
    tokenizer_from_json({"kind": "wordpiece"}, where="ckpt/7/tokenizer")


def test_char_tokenizer_on_tinyshakespeare_has_nanogpt_vocab():
  text = sources.tinyshakespeare("train") + sources.tinyshakespeare("val")
  tok = CharTokenizer.from_text(text)
  # nanoGPT's prepare.py prints these 65 characters; a change means another input file.
  assert "".join(tok.chars) == "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
  assert tok.encode("First") == [18, 47, 56, 57, 58]


def test_empty_corpus_is_a_clear_error():
  with pytest.raises(DataError, match="empty corpus"):
    train_sentencepiece(["", "\n\n"], vocab_size=300)
  with pytest.raises(DataError, match="empty corpus"):
    CharTokenizer.from_text("")


def test_load_tokenizer_from_a_directory_without_one(tmp_path):
  with pytest.raises(DataError, match="no tokenizer"):
    load_tokenizer(tmp_path)


def test_damaged_tokenizer_files_are_named(tmp_path):
  """Each way a saved tokenizer can be damaged names the file (was: a bare JSONDecodeError,
  KeyError, or sentencepiece's RuntimeError from its protobuf parser)."""
  train_sentencepiece([" ".join(f"w{i}" for i in range(300))] * 5, vocab_size=276).save(
    tmp_path / "sp"
  )
  meta, model = tmp_path / "sp" / "tokenizer.json", tmp_path / "sp" / "sentencepiece.model"
  assert load_tokenizer(tmp_path / "sp").vocab_size == 276
  model.write_bytes(model.read_bytes()[:50])  # truncated
  with pytest.raises(DataError, match=r"sentencepiece.model: not a sentencepiece model"):
    load_tokenizer(tmp_path / "sp")
  model.unlink()
  with pytest.raises(DataError, match=r"tokenizer.json: its model_file cannot be read"):
    load_tokenizer(tmp_path / "sp")
  meta.write_text('{"kind": "sentencepiece", ')
  with pytest.raises(DataError, match=r"tokenizer.json: not a tokenizer description"):
    load_tokenizer(tmp_path / "sp")
  meta.write_text('{"kind": "char", "chars": "abc"}')
  with pytest.raises(DataError, match=r"tokenizer.json: field 'chars' must be a list"):
    load_tokenizer(tmp_path / "sp")
  with pytest.raises(DataError, match=r"ckpt/4/tokenizer: no readable model_proto_base64"):
    tokenizer_from_json({"kind": "sentencepiece"}, where="ckpt/4/tokenizer")


def test_too_small_sentencepiece_vocab_names_the_setting():
  text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 400))  # 400 distinct characters
  with pytest.raises(DataError, match=r"vocab_size=64.*Vocabulary size is smaller"):
    train_sentencepiece([text] * 3, vocab_size=64, byte_fallback=False, character_coverage=1.0)
