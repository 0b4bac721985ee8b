"""Document quality rules from the published heuristics, each with its paper's default.

Gopher (Rae et al. 2021, appendix A.1.1): word count, mean word length, symbol-to-word ratio,
bullet and ellipsis lines, alphabetic words, stop words, and repetition (duplicate lines and
paragraphs, the top n-grams, duplicated n-grams). C4 / FineWeb: the fraction of lines that
end in terminal punctuation (FineWeb keeps a document when at least 12% do). Ours: characters
that are not text (control, unassigned, private-use and replacement characters). `check`
returns the first rule a document fails, in RULES order, so each removal has one cause."""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import unicodedata

import numpy as np

_WORD = re.compile(r"\S+")
_BULLETS = ("•", "●", "○", "▪", "◦", "–", "-", "*", "·")
_ELLIPSES = ("...", "…")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", ":", ";", ")", "]")
_NON_TEXT = {"Cc", "Cs", "Co", "Cn"}  # control, surrogate, private use, unassigned
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


@dataclasses.dataclass(frozen=True)
class QualityConfig:
  min_words: int = 50  # Gopher
  max_words: int = 100_000  # Gopher
  min_mean_word_length: float = 3.0  # Gopher
  max_mean_word_length: float = 10.0  # Gopher
  max_symbol_word_ratio: float = 0.1  # Gopher: '#' and ellipses per word
  max_bullet_lines: float = 0.9  # Gopher: fraction of lines starting with a bullet
  max_ellipsis_lines: float = 0.3  # Gopher: fraction of lines ending in an ellipsis
  min_alpha_words: float = 0.8  # Gopher: fraction of words with a letter
  min_stop_words: int = 2  # Gopher: distinct STOP_WORDS present
  max_duplicate_lines: float = 0.3  # Gopher: fraction of lines that repeat an earlier one
  max_duplicate_line_chars: float = 0.2  # Gopher: their share of the characters
  max_duplicate_paragraphs: float = 0.3  # Gopher
  max_duplicate_paragraph_chars: float = 0.2  # Gopher
  # Gopher: the most frequent n-gram's characters (n=2, 3, 4) over all word characters.
  max_top_ngram_chars: tuple = ((2, 0.20), (3, 0.18), (4, 0.16))
  # Gopher: characters in n-grams that occur more than once (n=5..10).
  max_duplicate_ngram_chars: tuple = (
    (5, 0.15),
    (6, 0.14),
    (7, 0.13),
    (8, 0.12),
    (9, 0.11),
    (10, 0.10),
  )
  min_punctuated_lines: float = 0.12  # FineWeb (C4's line rule, as a document fraction)
  max_non_text_chars: float = 0.01  # ours: control/unassigned/private/replacement characters


RULES = (
  "non_text_chars",
  "word_count",
  "mean_word_length",
  "symbol_word_ratio",
  "bullet_lines",
  "ellipsis_lines",
  "alpha_words",
  "stop_words",
  "punctuated_lines",
  "duplicate_lines",
  "duplicate_paragraphs",
  "top_ngrams",
  "duplicate_ngrams",
)


def check(text: str, cfg: QualityConfig = QualityConfig(), skip=()) -> str | None:
  """The first rule of RULES (not in `skip`) that `text` fails, or None if it passes all."""
  doc = _Doc(text)
  for rule in RULES:
    if rule not in skip and not _PASSES[rule](doc, cfg):
      return rule
  return None


class _Doc:
  """A document split once: words (whitespace-separated), non-empty lines, and on first use the
  distinct words with their counts, and each word as the integer id of its lower case."""

  def __init__(self, text: str):
    self.text = text
    self.words = _WORD.findall(text)
    self.lines = [line.strip() for line in text.split("\n") if line.strip()]
    self._ngrams: dict[int, tuple] = {}

  @functools.cached_property
  def counts(self) -> collections.Counter:
    return collections.Counter(self.words)

  @functools.cached_property
  def ids(self) -> tuple[np.ndarray, np.ndarray]:
    """(each word's id, each id's length): ids number the distinct lower-cased words."""
    lowered = _WORD.findall(self.text.lower())  # the same words as self.words, lower-cased
    index = {w: i for i, w in enumerate(dict.fromkeys(lowered))}
    ids = np.fromiter(map(index.__getitem__, lowered), dtype=np.int64, count=len(lowered))
    return ids, np.fromiter(map(len, index), dtype=np.int64, count=len(index))

  def ngrams(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the word n-grams: each position's n-gram as an id, and each id's first position
    and count. An n-gram's id is that of the pair (its first n-1 words' id, its last word's
    id), so the ids are exact and each n costs one sort of integers."""
    if n not in self._ngrams:
      ids, lengths = self.ids
      if n == 1:
        key = ids
      else:
        previous = self.ngrams(n - 1)[0][:-1]
        key = previous * len(lengths) + ids[n - 1 :]
      _, first, inverse, counts = np.unique(
        key, return_index=True, return_inverse=True, return_counts=True
      )
      self._ngrams[n] = (inverse, first, counts)
    return self._ngrams[n]


def _non_text(doc, cfg):
  bad = sum(doc.text.count(c) for c in set(doc.text) if _is_non_text(c))
  return bad <= cfg.max_non_text_chars * max(len(doc.text), 1)


def _is_non_text(c: str) -> bool:
  return c == "\ufffd" or (unicodedata.category(c) in _NON_TEXT and c not in "\n\t\r")


def _word_count(doc, cfg):
  return cfg.min_words <= len(doc.words) <= cfg.max_words


def _mean_word_length(doc, cfg):
  mean = sum(map(len, doc.words)) / max(len(doc.words), 1)
  return cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length


def _symbol_word_ratio(doc, cfg):
  symbols = doc.text.count("#") + sum(doc.text.count(e) for e in _ELLIPSES)
  return symbols <= cfg.max_symbol_word_ratio * max(len(doc.words), 1)


def _bullet_lines(doc, cfg):
  bullets = sum(1 for line in doc.lines if line.startswith(_BULLETS))
  return bullets <= cfg.max_bullet_lines * max(len(doc.lines), 1)


def _ellipsis_lines(doc, cfg):
  ending = sum(1 for line in doc.lines if line.endswith(_ELLIPSES))
  return ending <= cfg.max_ellipsis_lines * max(len(doc.lines), 1)


def _alpha_words(doc, cfg):
  alpha = sum(k for w, k in doc.counts.items() if any(map(str.isalpha, w)))
  return alpha >= cfg.min_alpha_words * len(doc.words)


def _stop_words(doc, cfg):
  present = {w.lower().strip(".,;:!?\"'()") for w in doc.counts} & set(STOP_WORDS)
  return len(present) >= cfg.min_stop_words


def _punctuated_lines(doc, cfg):
  ending = sum(1 for line in doc.lines if line.endswith(_TERMINAL) or line.endswith(_ELLIPSES))
  return ending >= cfg.min_punctuated_lines * max(len(doc.lines), 1)


def _duplicates(items: list[str]) -> tuple[int, int]:
  """(how many items repeat an earlier one, their characters)."""
  seen, count, chars = set(), 0, 0
  for item in items:
    if item in seen:
      count, chars = count + 1, chars + len(item)
    seen.add(item)
  return count, chars


def _duplicate_lines(doc, cfg):
  count, chars = _duplicates(doc.lines)
  total = sum(map(len, doc.lines))
  return count <= cfg.max_duplicate_lines * max(
    len(doc.lines), 1
  ) and chars <= cfg.max_duplicate_line_chars * max(total, 1)


def _duplicate_paragraphs(doc, cfg):
  paragraphs = [p.strip() for p in re.split(r"\n\s*\n", doc.text) if p.strip()]
  count, chars = _duplicates(paragraphs)
  total = sum(map(len, paragraphs))
  return count <= cfg.max_duplicate_paragraphs * max(
    len(paragraphs), 1
  ) and chars <= cfg.max_duplicate_paragraph_chars * max(total, 1)


def _top_ngrams(doc, cfg):
  """The most frequent n-gram (the earliest among equals) times its characters, over all the
  word characters (lower case)."""
  ids, lengths = doc.ids
  chars = lengths[ids]
  total = int(chars.sum())
  for n, limit in cfg.max_top_ngram_chars:
    if len(ids) < n:
      continue
    _, first, counts = doc.ngrams(n)
    times = int(counts.max())
    start = int(first[counts == times].min())
    if times > 1 and times * int(chars[start : start + n].sum()) > limit * total:
      return False
  return True


def _duplicate_ngrams(doc, cfg):
  """Characters of the words covered by an n-gram seen earlier in the document (each word
  counted once), as Gopher measures duplicated n-grams."""
  ids, lengths = doc.ids
  chars = lengths[ids]
  total = int(chars.sum())
  for n, limit in cfg.max_duplicate_ngram_chars:
    if len(ids) < n:
      continue
    inverse, first, _ = doc.ngrams(n)
    first_of = first[inverse]
    repeats = np.flatnonzero(first_of < np.arange(len(first_of)))
    edges = np.zeros(len(ids) + 1, dtype=np.int64)
    np.add.at(edges, repeats, 1)
    np.add.at(edges, repeats + n, -1)
    if int(chars[np.cumsum(edges[:-1]) > 0].sum()) > limit * total:
      return False
  return True


_PASSES = {
  "non_text_chars": _non_text,
  "word_count": _word_count,
  "mean_word_length": _mean_word_length,
  "symbol_word_ratio": _symbol_word_ratio,
  "bullet_lines": _bullet_lines,
  "ellipsis_lines": _ellipsis_lines,
  "alpha_words": _alpha_words,
  "stop_words": _stop_words,
  "punctuated_lines": _punctuated_lines,
  "duplicate_lines": _duplicate_lines,
  "duplicate_paragraphs": _duplicate_paragraphs,
  "top_ngrams": _top_ngrams,
  "duplicate_ngrams": _duplicate_ngrams,
}
