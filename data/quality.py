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
import re
import unicodedata

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
  words = _WORD.findall(text)
  lines = [line.strip() for line in text.split("\n") if line.strip()]
  for rule in RULES:
    if rule not in skip and not _PASSES[rule](text, words, lines, cfg):
      return rule
  return None


def _non_text(text, words, lines, cfg):
  bad = sum(
    1 for c in text if c == "\ufffd" or (unicodedata.category(c) in _NON_TEXT and c not in "\n\t\r")
  )
  return bad <= cfg.max_non_text_chars * max(len(text), 1)


def _word_count(text, words, lines, cfg):
  return cfg.min_words <= len(words) <= cfg.max_words


def _mean_word_length(text, words, lines, cfg):
  mean = sum(map(len, words)) / max(len(words), 1)
  return cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length


def _symbol_word_ratio(text, words, lines, cfg):
  symbols = text.count("#") + sum(text.count(e) for e in _ELLIPSES)
  return symbols <= cfg.max_symbol_word_ratio * max(len(words), 1)


def _bullet_lines(text, words, lines, cfg):
  bullets = sum(1 for line in lines if line.startswith(_BULLETS))
  return bullets <= cfg.max_bullet_lines * max(len(lines), 1)


def _ellipsis_lines(text, words, lines, cfg):
  ending = sum(1 for line in lines if line.endswith(_ELLIPSES))
  return ending <= cfg.max_ellipsis_lines * max(len(lines), 1)


def _alpha_words(text, words, lines, cfg):
  alpha = sum(1 for w in words if any(c.isalpha() for c in w))
  return alpha >= cfg.min_alpha_words * len(words)


def _stop_words(text, words, lines, cfg):
  present = {w.lower().strip(".,;:!?\"'()") for w in words} & set(STOP_WORDS)
  return len(present) >= cfg.min_stop_words


def _punctuated_lines(text, words, lines, cfg):
  ending = sum(1 for line in lines if line.endswith(_TERMINAL) or line.endswith(_ELLIPSES))
  return ending >= cfg.min_punctuated_lines * max(len(lines), 1)


def _duplicates(items: list[str]) -> tuple[int, int]:
  """(how many items repeat an earlier one, their characters)."""
  seen, count, chars = set(), 0, 0
  for item in items:
    if item in seen:
      count, chars = count + 1, chars + len(item)
    seen.add(item)
  return count, chars


def _duplicate_lines(text, words, lines, cfg):
  count, chars = _duplicates(lines)
  total = sum(map(len, lines))
  return count <= cfg.max_duplicate_lines * max(
    len(lines), 1
  ) and chars <= cfg.max_duplicate_line_chars * max(total, 1)


def _duplicate_paragraphs(text, words, lines, cfg):
  paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
  count, chars = _duplicates(paragraphs)
  total = sum(map(len, paragraphs))
  return count <= cfg.max_duplicate_paragraphs * max(
    len(paragraphs), 1
  ) and chars <= cfg.max_duplicate_paragraph_chars * max(total, 1)


def _ngrams(words: list[str], n: int):
  return zip(*(words[i:] for i in range(n)))


def _top_ngrams(text, words, lines, cfg):
  lowered = [w.lower() for w in words]
  total = sum(map(len, lowered))
  for n, limit in cfg.max_top_ngram_chars:
    counts = collections.Counter(_ngrams(lowered, n))
    if not counts:
      continue
    gram, times = counts.most_common(1)[0]
    if times > 1 and times * sum(map(len, gram)) > limit * total:
      return False
  return True


def _duplicate_ngrams(text, words, lines, cfg):
  """Characters of the words covered by an n-gram seen earlier in the document (each word
  counted once), as Gopher measures duplicated n-grams."""
  lowered = [w.lower() for w in words]
  total = sum(map(len, lowered))
  for n, limit in cfg.max_duplicate_ngram_chars:
    seen, covered = set(), [False] * len(lowered)
    for i, gram in enumerate(_ngrams(lowered, n)):
      if gram in seen:
        covered[i : i + n] = [True] * n
      seen.add(gram)
    if sum(len(w) for w, c in zip(lowered, covered) if c) > limit * total:
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
