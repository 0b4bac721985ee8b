"""Duplicates and contamination: exact (a hash of the normalised text), near (MinHash LSH from
datasketch, candidates checked by their estimated Jaccard similarity) and evaluation text
(word n-grams shared with evaluation files)."""

from __future__ import annotations

import hashlib
import re

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from data import sources

WORDS = re.compile(r"\w+")


def normalize(text: str) -> str:
  """Lower case, whitespace collapsed: copies that differ in case or spacing are one text."""
  return " ".join(text.lower().split())


def exact_key(text: str) -> bytes:
  return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


def words(text: str) -> list[str]:
  """Lower-cased words without punctuation: what n-grams and shingles are made of."""
  return WORDS.findall(text.lower())


def _hash32(data: bytes) -> int:
  return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "little")


def minhash(text: str, shingle: int, num_perm: int, seed: int) -> LeanMinHash:
  """The MinHash signature of a text's word `shingle`-grams (the whole text if shorter)."""
  w = words(text)
  n = min(shingle, max(len(w), 1))
  grams = {" ".join(w[i : i + n]).encode("utf-8") for i in range(max(len(w) - n + 1, 1))}
  m = MinHash(num_perm=num_perm, seed=seed, hashfunc=_hash32)
  m.update_batch(sorted(grams))
  return LeanMinHash(m)


class NearDuplicates:
  """MinHash signatures (num_perm = bands x rows, word `shingle`-grams) of the documents kept so
  far, in an LSH index. A document is a near-duplicate of a kept one when the index offers it
  as a candidate and their estimated Jaccard similarity is at least `threshold`: the bands
  give recall (a pair at similarity s is a candidate with probability 1 - (1 - s^rows)^bands),
  the estimate gives the threshold."""

  def __init__(self, threshold=0.8, shingle=5, bands=32, rows=4, seed=1):
    self.threshold, self.shingle, self.seed = threshold, shingle, seed
    self.num_perm = bands * rows
    self.lsh = MinHashLSH(num_perm=self.num_perm, params=(bands, rows))
    self.signatures: dict[str, np.ndarray] = {}
    self.order: dict[str, int] = {}

  def minhash(self, text: str) -> LeanMinHash:
    return minhash(text, self.shingle, self.num_perm, self.seed)

  def find(self, m: LeanMinHash) -> tuple[str, float] | None:
    """The most similar kept document at or above the threshold (the earliest added among
    equals), and its similarity."""
    best = None
    for key in sorted(self.lsh.query(m), key=self.order.__getitem__):
      similarity = similarity_of(self.signatures[key], m.hashvalues)
      if similarity >= self.threshold and (best is None or similarity > best[1]):
        best = (key, similarity)
    return best

  def add(self, key: str, m: LeanMinHash) -> None:
    self.lsh.insert(key, m)
    self.signatures[key] = m.hashvalues
    self.order[key] = len(self.order)


def similarity_of(a: np.ndarray, b: np.ndarray) -> float:
  """Jaccard similarity estimated by two MinHash signatures: the fraction of equal values."""
  return float(np.mean(a == b))


class Contamination:
  """Word n-grams of evaluation files (text: one passage per line; JSONL: `field` of each
  record). A training document sharing any of them is contaminated; `find` names the
  evaluation file, line and text. Passages shorter than n words (but at least `min_words`)
  count whole."""

  def __init__(self, paths, n=13, field="text", min_words=8):
    self.n, self.min_words = n, min_words
    self.grams: dict[bytes, tuple[str, int, str]] = {}
    self.lengths: set[int] = set()
    for path, lineno, passage in _passages(paths, field):
      w = words(passage)
      if len(w) < min_words:
        continue
      size = min(n, len(w))
      self.lengths.add(size)
      for i in range(len(w) - size + 1):
        self.grams.setdefault(_gram_key(w[i : i + size]), (path, lineno, passage.strip()))

  def find(self, text: str) -> tuple[str, int, str, str] | None:
    """(evaluation file, line, its text, the shared words) of the first match, or None."""
    w = words(text)
    for size in sorted(self.lengths, reverse=True):
      for i in range(len(w) - size + 1):
        hit = self.grams.get(_gram_key(w[i : i + size]))
        if hit:
          return (*hit, " ".join(w[i : i + size]))
    return None


def _gram_key(gram: list[str]) -> bytes:
  return hashlib.blake2b(" ".join(gram).encode("utf-8"), digest_size=12).digest()


def _passages(paths, field):
  for path in sources.expand_paths(paths, suffixes=sources.TEXT_SUFFIXES + sources.JSONL_SUFFIXES):
    if path.endswith(sources.JSONL_SUFFIXES):
      for file, lineno, record in sources.iter_jsonl(path):
        value = record.get(field)
        if not isinstance(value, str):
          raise sources.DataError(f"{file}:{lineno}: evaluation record has no text field {field!r}")
        yield file, lineno, value
    else:
      for lineno, line in sources.text_lines(path):
        yield path, lineno, line
