"""Duplicates and contamination: exact (a hash of the normalised text), near (MinHash LSH from
datasketch, candidates checked by their estimated Jaccard similarity) and evaluation text
(word n-grams shared with evaluation files)."""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=1 << 20)
def _word_hash(word: str) -> int:
  return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))


def shingles(text: str, shingle: int) -> np.ndarray:
  """32-bit hashes of the text's word `shingle`-grams (the whole text if shorter): each
  word's blake2b hash, combined along the shingle and mixed (murmur3's finaliser)."""
  w = words(text) or [""]
  n = min(shingle, len(w))
  hashes = np.fromiter(map(_word_hash, w), dtype=np.uint64, count=len(w))
  rows = np.lib.stride_tricks.sliding_window_view(hashes, n)
  h = rows[:, 0].copy()
  for k in range(1, n):
    h = h * _MIX[0] + rows[:, k]  # wraps modulo 2^64
  h ^= h >> np.uint64(33)
  h *= _MIX[1]
  h ^= h >> np.uint64(33)
  h *= _MIX[2]
  h ^= h >> np.uint64(33)
  return (h >> np.uint64(32)).astype(np.uint32)


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int):
  return MinHash(num_perm=num_perm, seed=seed).permutations


def minhash(text: str, shingle: int, num_perm: int, seed: int) -> LeanMinHash:
  """datasketch's MinHash signature of the text's shingle hashes."""
  m = MinHash(
    num_perm=num_perm,
    seed=seed,
    hashfunc=int,  # the values are hashes already
    permutations=_permutations(num_perm, seed),
    scheme="affine32",
  )
  m.update_batch(shingles(text, shingle).tolist())
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
