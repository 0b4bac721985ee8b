"""A Hugging Face tokenizer.json (byte-level BPE trained here with the `tokenizers` library)
and a checkpoint's chat template, against transformers' own tokenizer: ids, text, special
tokens, rendered chats and the assistant mask."""

import json

import pytest

from data import chat
from data.hf_tokenizer import load_hf_tokenizer
from data.sources import DataError
from data.tokenizer import load_tokenizer, tokenizer_from_json, tokenizer_to_json

SPECIALS = ["<|endoftext|>", "<|begin|>", "<|im_start|>", "<|im_end|>", "<pad>"]
# Qwen's layout; the tagged one marks what the assistant writes for transformers' mask.
TURN = "<|im_start|>{{ m['role'] }}\n"
TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}" + TURN + "{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TAGGED = (
  "{{ bos_token }}{% for m in messages %}" + TURN + "{% if m['role'] == 'assistant' %}"
  "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
  "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = [
  "Hello, world! Ça va? 日本語 and emoji 🙂.",
  "  leading spaces\tand tabs\nnew lines <|im_end|> inside",
  "<|begin|>a special token first, then <|im_start|> text",
  "",
]
CHAT = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "What is 2+2?"},
  {"role": "assistant", "content": "4."},
  {"role": "user", "content": "And 3+3? 日本"},
  {"role": "assistant", "content": "Six, 🙂 surely."},
]


def write_folder(folder, template):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  corpus = [t * 3 for t in TEXTS + [m["content"] for m in CHAT]] * 20
  tok.train_from_iterator(corpus, trainer)
  # As Llama 3's: the post-processor puts bos first when special tokens are added.
  tok.post_processor = processors.TemplateProcessing(
    single="<|begin|> $A", special_tokens=[("<|begin|>", tok.token_to_id("<|begin|>"))]
  )
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|begin|>",
    "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
    "pad_token": "<pad>",
    "chat_template": template,
  }
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_tok")
  return {
    name: write_folder(root / name, t) for name, t in (("plain", TEMPLATE), ("tagged", TAGGED))
  }


def hf(folder):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(folder))


def test_encode_and_decode_equal_transformers_with_special_tokens(folders):
  ours, theirs = load_hf_tokenizer(str(folders["plain"])), hf(folders["plain"])
  assert ours.vocab_size == len(theirs)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
    theirs.bos_token_id,
    theirs.eos_token_id,
    theirs.pad_token_id,
  )
  for text in TEXTS:
    want = theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text) == want, text
    assert ours.encode(text, bos=True) == theirs(text)["input_ids"], text
    assert ours.decode(want) == theirs.decode(want) == text
  assert ours.encode_batch(TEXTS, eos=True) == [
    theirs(t, add_special_tokens=False)["input_ids"] + [theirs.eos_token_id] for t in TEXTS
  ]
  # Padding is what batches add: decoding drops it, as for our other tokenizers.
  pad = [theirs.pad_token_id] * 3
  assert ours.decode(ours.encode(TEXTS[0]) + pad) == TEXTS[0]
  # Specials inside text are one id each, as transformers has them.
  assert ours.encode("<|im_end|>") == [theirs.convert_tokens_to_ids("<|im_end|>")]
  # Saved, in a checkpoint's JSON or a folder, it is the same tokenizer.
  again = tokenizer_from_json(json.loads(json.dumps(tokenizer_to_json(ours))))
  assert [again.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
  ours.save(str(folders["plain"] / "ours"))
  loaded = load_tokenizer(str(folders["plain"] / "ours"))
  assert loaded.chat_template.source == TEMPLATE and loaded.pad_id == ours.pad_id


@pytest.mark.parametrize("name", ["plain", "tagged"])
def test_chat_template_renders_apply_chat_template_and_masks_the_assistant(folders, name):
  """Both templates give transformers' ids; the mask equals transformers' assistant mask of
  the tagged template: from the tags, or (untagged) from what each assistant turn adds."""
  ours, theirs = load_hf_tokenizer(str(folders[name])), hf(folders[name])
  ids, mask = chat.render_chat(ours, CHAT)
  want = theirs.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
  assert ids == want
  tagged = hf(folders["tagged"]).apply_chat_template(
    CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
  )
  assert tagged["input_ids"] == ids and mask == tagged["assistant_masks"]
  assert sum(mask) > 0
  # The masked tokens decode to the assistant's turns and their end tokens, nothing else.
  spans = "".join(ours.decode([i]) for i, m in zip(ids, mask) if m)
  assert spans == "4.<|im_end|>\nSix, 🙂 surely.<|im_end|>\n"
  prompt = chat.render_prompt(ours, CHAT[:2])
  assert prompt == theirs.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]  # fmt: skip
  assert chat.template_item(ours) == {"kind": "jinja", "source": ours.chat_template.source}


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
  # The last assistant turn is rendered apart from earlier ones: no prefix to diff against.
  template = (
    "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['content'] }}|{% endfor %}"
  )
  tok = load_hf_tokenizer(str(write_folder(tmp_path / "odd", template)))
  with pytest.raises(DataError, match=r"renders turn 2 differently.*\{% generation %\}"):
    chat.render_chat(tok, CHAT[:4])
  with pytest.raises(DataError, match=r"chat template does not parse \(line 1\)"):
    load_hf_tokenizer(str(write_folder(tmp_path / "bad", "{% for m in messages %}")))


def test_a_tokenizer_without_bos_adds_none_and_starts_samples_at_eos(folders, tmp_path):
  config = json.loads((folders["plain"] / "tokenizer_config.json").read_text())
  del config["bos_token"]
  folder = tmp_path / "no_bos"
  folder.mkdir()
  (folder / "tokenizer.json").write_text((folders["plain"] / "tokenizer.json").read_text())
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  tok = load_hf_tokenizer(str(folder))
  assert tok.bos_id is None and tok.encode("abc", bos=True) == tok.encode("abc")
  assert tok.start_id == tok.eos_id == hf(folder).eos_token_id
