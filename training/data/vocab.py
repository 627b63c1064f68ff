"""The text side's vocabulary: texts and tags become 0/1 bag-of-words vectors.

The tokeniser rules are data, saved with the vocabulary, so the runtime (which has no
torch) can reproduce the same vector from the same text:

1. Unicode NFKC normalisation, then lowercase.
2. Tokens are the maximal runs of letters and digits (regex ``[^\\W_]+``): punctuation,
   underscores and whitespace separate tokens.
3. With ``ngram_max = 2`` adjacent tokens also form the bigram ``"a b"`` (one space), so
   "red circle" and "circle red" are told apart.
4. A term is in the vector if it is in the vocabulary; others are dropped. Entries are
   0/1 (presence), as in the papers' tag vectors.

Tags given as a list are tokenised one by one (no bigrams across two tags).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import DataError

FORMAT = "cmhash-vocabulary"
VERSION = 1
TOKEN_PATTERN = r"[^\W_]+"
_TOKEN_RE = re.compile(TOKEN_PATTERN)


def tokenize(text: str, ngram_max: int = 1) -> list[str]:
    """The terms of ``text`` by the rules in the module docstring (duplicates kept)."""
    words = _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())
    terms = list(words)
    for n in range(2, ngram_max + 1):
        terms += [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    return terms


def document(text: str | None, tags: Sequence[str] = (), ngram_max: int = 1) -> list[str]:
    """The terms of one sample: its text plus each of its tags (tokenised separately)."""
    terms = tokenize(text, ngram_max) if text else []
    for tag in tags:
        terms += tokenize(tag, ngram_max)
    return terms


class Vocabulary:
    """An ordered list of terms; position i is column i of the bag-of-words vector.

    ``anonymous`` vocabularies (:meth:`anonymous`) have placeholder terms ``#0``, ``#1``,
    ...: data such as the MIRFlickr tag matrix comes as column indices whose words
    were never published, so only indices can be encoded.
    """

    def __init__(self, terms: Sequence[str], ngram_max: int = 1, min_count: int = 1, anonymous: bool = False):
        terms = list(terms)
        if not terms:
            raise DataError("a vocabulary needs at least one term; the training texts held none "
                            "(lower min_count or check the text/tags fields)")
        if len(set(terms)) != len(terms):
            dup = [t for t, c in Counter(terms).items() if c > 1][:5]
            raise DataError(f"vocabulary terms must be unique; repeated: {dup}")
        if ngram_max < 1:
            raise DataError(f"ngram_max must be >= 1, got {ngram_max}")
        self.terms = terms
        self.ngram_max = int(ngram_max)
        self.min_count = int(min_count)
        self.anonymous = bool(anonymous)
        self._index = {t: i for i, t in enumerate(terms)}

    # construction -------------------------------------------------------------------
    @classmethod
    def build(cls, documents: Iterable[Sequence[str]], min_count: int = 1, max_size: int | None = None,
              ngram_max: int = 1) -> "Vocabulary":
        """From tokenised documents (see :func:`tokenize`): every term found in at least
        ``min_count`` documents, most frequent first, ties in alphabetical order, at most
        ``max_size`` of them."""
        if min_count < 1:
            raise DataError(f"min_count must be >= 1, got {min_count}")
        counts = Counter()
        for doc in documents:
            counts.update(set(doc))  # document frequency: a word repeated in one caption counts once
        kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[:max_size]
        if not kept:
            raise DataError(f"no term occurs in at least min_count={min_count} training documents "
                            f"({len(counts)} distinct terms seen); lower min_count")
        return cls(kept, ngram_max=ngram_max, min_count=min_count)

    @classmethod
    def anonymous(cls, size: int) -> "Vocabulary":
        """Placeholder terms ``#0 .. #size-1`` for data given as column indices only."""
        return cls([f"#{i}" for i in range(size)], anonymous=True)

    # encoding -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.terms)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.to_dict() == other.to_dict()

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.ngram_max)

    def document(self, text: str | None = None, tags: Sequence[str] = ()) -> list[str]:
        return document(text, tags, self.ngram_max)

    def columns(self, terms: Iterable[str]) -> np.ndarray:
        """Sorted unique column indices of the known terms (unknown terms are dropped)."""
        cols = {self._index[t] for t in terms if t in self._index}
        return np.array(sorted(cols), dtype=np.int64)

    def encode(self, text: str | None = None, tags: Sequence[str] = ()) -> np.ndarray:
        """The float32 0/1 bag-of-words vector of a text and/or tags."""
        if self.anonymous:
            raise DataError("this vocabulary has no words (its data came as column indices); "
                            "encode with encode_indices")
        vec = np.zeros(len(self), dtype=np.float32)
        vec[self.columns(self.document(text, tags))] = 1.0
        return vec

    def encode_indices(self, indices: Iterable[int]) -> np.ndarray:
        idx = np.asarray(list(indices), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(f"tag indices must lie in [0, {len(self)}), got min {idx.min()} max {idx.max()}")
        vec = np.zeros(len(self), dtype=np.float32)
        vec[idx] = 1.0
        return vec

    # persistence --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": {
                "normalization": "NFKC",
                "lowercase": True,
                "token_pattern": TOKEN_PATTERN,
                "ngram_max": self.ngram_max,
                "weighting": "binary",
            },
            "min_count": self.min_count,
            "anonymous": self.anonymous,
            "terms": self.terms,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        if d.get("format") != FORMAT:
            raise DataError(f"not a cmhash vocabulary (format={d.get('format')!r})")
        if d.get("version") != VERSION:
            raise DataError(f"vocabulary version {d.get('version')} is not supported (this cmhash reads {VERSION})")
        tok = d["tokenizer"]
        if tok.get("token_pattern") != TOKEN_PATTERN or tok.get("lowercase") is not True:
            raise DataError(f"vocabulary uses tokeniser rules this cmhash does not implement: {tok}")
        return cls(d["terms"], ngram_max=tok["ngram_max"], min_count=d.get("min_count", 1),
                   anonymous=d.get("anonymous", False))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
