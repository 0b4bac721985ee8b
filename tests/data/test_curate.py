"""Curation on a corpus built here with known duplicates (exact, and near at similarities
measured exactly on the shingle sets), documents built to fail one quality rule each, and
planted evaluation text: each is removed for its reason (near copies within 0.05 of the
threshold excepted), the counts add up, an interrupted run resumes to the same output, and the
output goes through prepare and pretraining as any corpus."""

import json
import os

import numpy as np
import pytest

from data import curate, dedup, quality, sources
from data.curate import CurateConfig

VOCAB = [
  "river", "castle", "morning", "silver", "garden", "letter", "window", "stone", "winter",
  "candle", "harbor", "meadow", "lantern", "orchard", "mirror", "valley", "forest", "thunder",
  "feather", "market", "bridge", "shadow", "island", "mountain", "village", "kingdom", "sailor",
  "painter", "teacher", "farmer", "doctor", "soldier", "merchant", "traveler", "writer",
  "quietly", "slowly", "bright", "gentle", "ancient", "hidden", "golden", "distant", "simple",
  "walked", "carried", "watched", "opened", "followed", "remembered", "painted", "gathered",
]  # fmt: skip
THRESHOLD = 0.8


def good_doc(rng, sentences=14) -> str:
  """Prose that passes every quality rule: sentences of random words with stop words, one per
  line, each ending in a full stop."""
  lines = []
  for _ in range(sentences):
    w = list(rng.choice(VOCAB, 9))
    lines.append(f"The {w[0]} and the {w[1]} of {' '.join(w[2:])} with {rng.integers(1e6)}.")
  return "\n".join(lines)


def jaccard(a: str, b: str, n=5) -> float:
  """Exact Jaccard similarity of the word n-gram sets (the reference for the MinHash one)."""
  sa, sb = (
    {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)} for w in map(dedup.words, (a, b))
  )
  return len(sa & sb) / len(sa | sb)


def near_copy(rng, doc: str, edits: int) -> str:
  words = doc.split(" ")
  for i in rng.choice(len(words), edits, replace=False):
    words[i] = str(rng.choice(VOCAB))
  return " ".join(words)


SHORT = ["to", "be", "or", "do", "it", "of", "the", "so", "we", "go", "up", "as", "an", "if", "me"]


def junk(rng) -> dict[str, str]:
  """A document per quality rule, failing that rule alone."""
  g = lambda k=14: good_doc(rng, k)
  words = lambda n, vocab=VOCAB: " ".join(rng.choice(vocab, n))
  return {
    "non_text_chars": g() + "\x07" * 30,
    "word_count": "The river and the castle of the morning.",
    "mean_word_length": "\n".join(f"{words(12, SHORT).capitalize()}." for _ in range(10)),
    "symbol_word_ratio": g() + "\n" + " ".join(f"#{w}" for w in rng.choice(VOCAB, 30)) + ".",
    "bullet_lines": "\n".join(f"- {line}" for line in g().split("\n")),
    "ellipsis_lines": "\n".join(line[:-1] + "..." for line in g(8).split("\n")) + "\n" + g(8),
    "alpha_words": g(6) + "\n" + " ".join(str(rng.integers(1e6)) for _ in range(60)) + ".",
    "stop_words": "\n".join(f"{words(10).capitalize()}." for _ in range(10)),
    "punctuated_lines": "\n".join(line[:-1] for line in g().split("\n")),
    "duplicate_lines": g(6) + "\n" + "\n".join(["Thank you."] * 5),
    "duplicate_paragraphs": "\n\n".join(g(8) for _ in range(6)) + "\n\nThe end." * 5,
    "top_ngrams": g(2) + "\n" + "\n".join(f"{words(2)} silver lantern {words(2)}." for _ in range(30)),
    "duplicate_ngrams": g(10) + "\n" + "\n".join(
      f"{w} said the ancient painter of the distant valley to the gentle farmer today."
      for w in rng.choice(VOCAB, 5, replace=False)
    ),
  }  # fmt: skip


def test_each_junk_document_fails_its_rule_alone():
  for rule, text in junk(np.random.default_rng(0)).items():
    assert quality.check(text) == rule, (rule, quality.check(text))
    alone = [r for r in quality.RULES if quality.check(text, skip=set(quality.RULES) - {r})]
    assert alone == [rule], (rule, alone)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """corpus.jsonl and eval.jsonl, and what each document is: planted duplicates (exact and
  near, with their exact similarity), junk (its rule) and contamination."""
  root = tmp_path_factory.mktemp("curate")
  rng = np.random.default_rng(1)
  originals = [good_doc(rng) for _ in range(120)]
  evals = [good_doc(rng, 2) for _ in range(6)]
  docs, truth = [], {}

  def add(text, what):
    truth[len(docs)] = what
    docs.append(text)

  for text in originals:
    add(text, ("original",))
  for text in originals[:10]:  # exact copies: the same text, and in other case and spacing
    add(text, ("exact",))
    add("  " + text.upper().replace(" ", "   "), ("exact",))
  for k, text in enumerate(originals[10:110]):  # one near copy each, 0..60 words changed
    copy = near_copy(rng, text, edits=[1, 2, 3, 4, 8, 12, 20, 30, 45, 60][k % 10])
    add(copy, ("near", jaccard(text, copy)))
  for rule, text in junk(rng).items():
    add(text, ("junk", rule))
  for k, passage in enumerate(evals[:4]):  # 14 of the passage's words inside new prose
    shared = " ".join(passage.split()[3:17])
    add(good_doc(rng, 6) + f"\nAs written {shared} and so on.\n" + good_doc(rng, 6), ("eval", k))
  with open(root / "corpus.jsonl", "w") as f:
    for text in docs:
      f.write(json.dumps({"text": text}) + "\n")
  with open(root / "eval.jsonl", "w") as f:
    for passage in evals:
      f.write(json.dumps({"text": passage}) + "\n")
  return root, docs, truth


def run(corpus, out, stop_after=None):
  root, _, _ = corpus
  cfg = CurateConfig(threshold=THRESHOLD, checkpoint_docs=40)
  evals = [str(root / "eval.jsonl")]
  return curate.curate(
    str(root / "corpus.jsonl"), str(out), cfg, evals, progress=False, stop_after=stop_after
  )


def outcomes(out) -> set[int]:
  kept = set()
  for name in sorted(os.listdir(out)):
    if name.startswith("part-"):
      with open(os.path.join(out, name)) as f:
        kept |= {int(json.loads(line)["id"].rsplit(":", 1)[1]) - 1 for line in f}
  return kept


def test_curation_removes_what_was_planted(corpus, tmp_path):
  _, docs, truth = corpus
  report = run(corpus, tmp_path / "out")
  kept = outcomes(tmp_path / "out")
  kinds = lambda k: {i for i, w in truth.items() if w[0] == k}
  assert kinds("original") <= kept, "no original may go"
  assert not kinds("exact") & kept, "every exact copy goes"
  # Copies within 0.05 of the threshold are not judged: 128 MinHash values estimate a
  # similarity near 0.8 with a standard deviation of 0.035.
  above = {i for i, w in truth.items() if w[0] == "near" and w[1] >= THRESHOLD + 0.05}
  below = {i for i, w in truth.items() if w[0] == "near" and w[1] < THRESHOLD - 0.05}
  assert len(above) >= 20 and len(below) >= 20, (len(above), len(below))
  assert len(above - kept) >= 0.95 * len(above), "recall of near copies above the threshold"
  assert len(below & kept) >= 0.95 * len(below), "near copies below it are kept"
  assert not kinds("eval") & kept, "every planted evaluation passage is caught"
  removed_for = {k: v["documents"] for k, v in report["removed"].items()}
  for rule in quality.RULES:
    assert removed_for.get(f"quality:{rule}") == 1, rule
  assert [c["id"] for c in report["contaminated"]] == [
    f"{corpus[0]}/corpus.jsonl:{i + 1}" for i in sorted(kinds("eval"))
  ]
  for field in ("documents", "words", "bytes"):
    assert report["in"][field] == report["kept"][field] + sum(
      v[field] for v in report["removed"].values()
    )
  assert report["in"]["documents"] == len(docs) and report["kept"]["documents"] == len(kept)
  sizes = sum(c["size"] - 1 for c in report["duplicate_clusters"])
  assert sizes == removed_for["exact_duplicate"] + removed_for["near_duplicate"]


def test_an_interrupted_run_resumes_to_the_same_output(corpus, tmp_path):
  whole = run(corpus, tmp_path / "whole")
  assert run(corpus, tmp_path / "cut", stop_after=150) == {}  # stops mid-part, after 3 checkpoints
  assert os.path.exists(tmp_path / "cut" / curate.STATE)
  resumed = run(corpus, tmp_path / "cut")
  assert {k: v for k, v in resumed.items() if k != "config"} == {
    k: v for k, v in whole.items() if k != "config"
  }
  read = lambda d: [
    open(os.path.join(d, n)).read() for n in sorted(os.listdir(d)) if n.startswith("part-")
  ]
  assert read(tmp_path / "cut") == read(tmp_path / "whole")


def test_curated_output_prepares_and_trains(corpus, tmp_path):
  from configs.experiments import tiny_test
  from data.prepare import prepare
  from data.tokenizer import CharTokenizer
  from train import loop

  run(corpus, tmp_path / "out")
  kept = list(curate.documents(str(tmp_path / "out" / "part-*.jsonl")))
  assert len(kept) == len(outcomes(tmp_path / "out"))
  texts = [text for _, text in kept]
  tok = CharTokenizer.from_text("".join(texts))
  for split, docs in (("train", texts[10:]), ("val", texts[:10])):
    prepare(docs, tok, tmp_path / "data" / split, progress=False)
  c = tiny_test.get_config()
  c.data.corpus, c.data.path = "shards", str(tmp_path / "data")
  c.train.steps, c.train.checkpoint_every = 2, 2
  summary = loop.train(c, str(tmp_path / "run"))
  assert summary["final_step"] == 2 and np.isfinite(summary["val_loss"])


def split_corpus(corpus, root) -> str:
  """The corpus in three files, so that two datatrove tasks interleave them (files 0 and 2,
  and file 1): a glob of them."""
  lines = open(corpus[0] / "corpus.jsonl").read().splitlines(True)
  os.makedirs(root)
  for k, part in enumerate((lines[:100], lines[100:200], lines[200:])):
    with open(root / f"c{k}.jsonl", "w") as f:
      f.writelines(part)
  return str(root / "c*.jsonl")


def parts(out) -> list[str]:
  return sorted(
    line for n in os.listdir(out) if n.startswith("part-") for line in open(os.path.join(out, n))
  )


def test_datatrove_executor_gives_the_one_process_output(corpus, tmp_path):
  """The same rules as datatrove steps on its local executor, two tasks in two processes: the
  same documents kept and the same report (counts, clusters, contamination) as one process."""
  from data import curate_scale

  source = split_corpus(corpus, tmp_path / "in")
  cfg, evals = CurateConfig(threshold=THRESHOLD), [str(corpus[0] / "eval.jsonl")]
  one = curate.curate(source, str(tmp_path / "one"), cfg, evals, progress=False)
  scaled = curate_scale.curate_at_scale(
    source, str(tmp_path / "dt"), cfg, evals, tasks=2, workers=2
  )
  assert scaled == one
  assert len(one["duplicate_clusters"]) > 20 and len(one["contaminated"]) == 4
  assert parts(tmp_path / "dt") == parts(tmp_path / "one")
  assert len(os.listdir(tmp_path / "dt" / "work" / "dups")) == cfg.bands


def test_datatrove_executor_resumes_and_refuses_another_config(corpus, tmp_path):
  """A run stopped after its first two stages resumes without redoing them, to the output of a
  run that never stopped; a resume under another config is refused."""
  from data import curate_scale

  source = split_corpus(corpus, tmp_path / "in")
  cfg, out = CurateConfig(threshold=THRESHOLD), str(tmp_path / "cut")
  whole = curate_scale.curate_at_scale(source, str(tmp_path / "whole"), cfg, tasks=2)
  assert curate_scale.curate_at_scale(source, out, cfg, tasks=2, stop_after_stage=2) == {}
  docs = os.path.join(out, "work", "docs", "00000.jsonl")
  written = os.stat(docs).st_mtime_ns
  assert not os.path.exists(os.path.join(out, curate.REPORT))
  assert curate_scale.curate_at_scale(source, out, cfg, tasks=2) == whole
  assert os.stat(docs).st_mtime_ns == written, "the first stage ran again"
  assert parts(out) == parts(tmp_path / "whole")
  with pytest.raises(sources.DataError, match="another config"):
    curate_scale.curate_at_scale(source, out, CurateConfig(threshold=0.7), tasks=2)
  with pytest.raises(sources.DataError, match="tasks differ"):  # another split of the files
    curate_scale.curate_at_scale(source, out, cfg, tasks=1)
