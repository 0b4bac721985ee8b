"""The quality rules' vectorised measures against slow Python loops written from the rules'
definitions, on documents with many repeated words, lines and phrases, at a sweep of limits so
that every measured value is pinned down, not just one verdict."""

import collections
import dataclasses
import unicodedata

import numpy as np

from data import quality
from data.quality import QualityConfig

LIMITS = np.linspace(0.0, 0.6, 61)


def top_ngram_share(words, n) -> float:
  """The most frequent n-gram's characters times its count, over all word characters."""
  lowered = [w.lower() for w in words]
  grams = collections.Counter(zip(*(lowered[i:] for i in range(n))))
  if not grams:
    return 0.0
  gram, times = grams.most_common(1)[0]
  return times * sum(map(len, gram)) / sum(map(len, lowered)) if times > 1 else 0.0


def duplicate_ngram_share(words, n) -> float:
  """Characters of words inside an n-gram that occurred earlier, over all word characters."""
  lowered = [w.lower() for w in words]
  seen, covered = set(), [False] * len(lowered)
  for i in range(len(lowered) - n + 1):
    gram = tuple(lowered[i : i + n])
    if gram in seen:
      for j in range(i, i + n):
        covered[j] = True
    seen.add(gram)
  return sum(len(w) for w, c in zip(lowered, covered) if c) / max(sum(map(len, lowered)), 1)


def non_text_share(text) -> float:
  bad = 0
  for c in text:
    if c == "\ufffd" or (unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") and c not in "\n\t\r"):
      bad += 1
  return bad / max(len(text), 1)


def alpha_share(words) -> float:
  return sum(1 for w in words if any(c.isalpha() for c in w)) / max(len(words), 1)


def documents(seed, count=40):
  """Prose drawn from a small vocabulary (so n-grams repeat by chance), with copied phrases,
  mixed case, digits, symbols, control and private-use characters, and short documents."""
  rng = np.random.default_rng(seed)
  vocab = ["the", "The", "of", "river", "Stone", "a", "to", "123", "#", "İs", "x\x07", "\ue000y"]
  for k in range(count):
    words = list(rng.choice(vocab, rng.integers(0, 300)))
    for _ in range(rng.integers(0, 6)):  # copy a phrase to another place
      if len(words) > 12:
        i, n, j = rng.integers(0, len(words) - 12), rng.integers(2, 12), rng.integers(len(words))
        words[j:j] = words[i : i + n]
    yield " ".join(words) if k % 5 else "\n".join(words)


def test_ngram_rules_match_slow_loops():
  skip = tuple(r for r in quality.RULES if r not in ("top_ngrams", "duplicate_ngrams"))
  for text in documents(0):
    words = text.split()
    for n in (2, 3, 4):
      share = top_ngram_share(words, n)
      for limit in LIMITS:
        cfg = QualityConfig(max_top_ngram_chars=((n, limit),), max_duplicate_ngram_chars=())
        assert (quality.check(text, cfg, skip) is None) == (share <= limit), (n, limit, share)
    for n in (5, 7, 10):
      share = duplicate_ngram_share(words, n)
      for limit in LIMITS:
        cfg = QualityConfig(max_top_ngram_chars=(), max_duplicate_ngram_chars=((n, limit),))
        assert (quality.check(text, cfg, skip) is None) == (share <= limit), (n, limit, share)


def test_character_and_word_rules_match_slow_loops():
  for rule, field, measure, keep in (
    ("non_text_chars", "max_non_text_chars", non_text_share, lambda s, v: s <= v),
    ("alpha_words", "min_alpha_words", lambda t: alpha_share(t.split()), lambda s, v: s >= v),
  ):
    skip = tuple(r for r in quality.RULES if r != rule)
    for text in documents(1):
      share = measure(text)
      for limit in np.concatenate([LIMITS, LIMITS + 0.4]):
        cfg = dataclasses.replace(QualityConfig(), **{field: limit})
        assert (quality.check(text, cfg, skip) is None) == keep(share, limit), (rule, limit)
