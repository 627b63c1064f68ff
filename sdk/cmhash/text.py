"""Text -> bag-of-words, shared by training and the runtime.

A :class:`Vocabulary` is an ordered word list plus the tokenisation rules it was built
with; both are saved together in one JSON file, so a bundle tokenises exactly as training
did. The rules (version 1):

1. Unicode NFKC normalisation (full-width letters, ligatures and compatibility forms fold
   to their plain equivalents),
2. lower case (``str.lower``),
3. split on every character that is not a letter or a digit (``[^\\W_]+`` runs; underscore
   and punctuation separate words),
4. with ``ngram_max`` = n > 1, every run of 2..n adjacent words is a term too, written with
   one space (``"red circle"``), so that word order counts ("a red circle above a blue
   square" is not "a blue circle above a red square").

A vocabulary can also be *anonymous*: a number of columns whose words were never published
(the MIRFlickr-25K and NUS-WIDE tag matrices). Such a model takes bag-of-words vectors or
tag indices, not raw text.

A text becomes a multi-hot float32 vector: 1.0 at every vocabulary word it contains, 0.0
elsewhere; words outside the vocabulary are dropped, so an empty text (or one with no
known word) is the legal all-zero vector. A tag list is read as a text already split into
parts: each tag goes through the same rules (n-grams never span two tags), so
``["New York", "cat"]`` and ``"new york cat"`` encode alike. Bytes must be UTF-8.
"""

from __future__ import annotations

import collections.abc
import hashlib
import json
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .files import atomic_write
from .errors import InvalidArgumentError, TextInputError, UnsupportedInputError, VocabularyError

RULES_VERSION = 1
DEFAULT_RULES = {"version": RULES_VERSION, "normalization": "NFKC", "lowercase": True, "split": "non-alphanumeric", "ngram_max": 1}
_WORD = re.compile(r"[^\W_]+")


def rules_with(**changes) -> dict:
    """The default rules with some changed, e.g. ``rules_with(ngram_max=2)``."""
    return _check_rules({**DEFAULT_RULES, **changes})


def tokenize(text: str | bytes, rules: dict | None = None) -> list[str]:
    """The terms of a text by the rules (the defaults unless given): its words, then its
    n-grams up to ``ngram_max``; repeats are kept."""
    rules = _check_rules(rules or DEFAULT_RULES)
    text = _as_str(text)
    if rules["normalization"]:
        text = unicodedata.normalize(rules["normalization"], text)
    if rules["lowercase"]:
        text = text.lower()
    words = _WORD.findall(text)
    terms = list(words)
    for n in range(2, rules["ngram_max"] + 1):
        terms += [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    return terms


def _as_str(text: Any) -> str:
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextInputError(
                f"text bytes are not valid UTF-8 ({exc.reason} at byte {exc.start}); decode them with "
                "the right codec first and pass a str"
            ) from exc
    if not isinstance(text, str):
        raise UnsupportedInputError(f"a text must be str or UTF-8 bytes, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates, e.g. from errors="surrogateescape"
        raise TextInputError(
            f"text holds characters that are not valid Unicode ({exc.reason} at {exc.start}); it was "
            "probably decoded from non-UTF-8 bytes"
        ) from exc
    return text


def _check_rules(rules: dict) -> dict:
    rules = {"ngram_max": 1, **rules}  # files written before n-grams existed hold unigrams
    if rules.get("version") != RULES_VERSION:
        raise VocabularyError(
            f"tokenisation rules version {rules.get('version')!r} is not supported (this cmhash knows "
            f"version {RULES_VERSION}); upgrade cmhash-sdk"
        )
    if rules.get("normalization") not in ("NFKC", "NFC", None) or rules.get("split") != "non-alphanumeric":
        raise VocabularyError(f"unknown tokenisation rules {rules}; known: {DEFAULT_RULES}")
    if not isinstance(rules.get("lowercase"), bool):
        raise VocabularyError(f"tokenisation rule 'lowercase' must be true or false, got {rules.get('lowercase')!r}")
    ngram_max = rules["ngram_max"]
    if isinstance(ngram_max, bool) or not isinstance(ngram_max, int) or not 1 <= ngram_max <= 5:
        raise VocabularyError(f"tokenisation rule 'ngram_max' must be an integer from 1 to 5, got {ngram_max!r}")
    return rules


class _Placeholders(collections.abc.Sequence):
    """The names ``#0 .. #size-1`` of an anonymous vocabulary, made on demand: a file that
    claims a billion columns costs nothing until a model of that width is checked against it."""

    def __init__(self, size: int):
        self._size = size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(f"#{j}" for j in range(*i.indices(self._size)))
        if not -self._size <= i < self._size:
            raise IndexError(i)
        return f"#{i % self._size}"

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, (tuple, _Placeholders)) else NotImplemented

    def __contains__(self, word) -> bool:
        return isinstance(word, str) and self._position(word) is not None

    def index(self, word, *args) -> int:
        position = self._position(word)
        if position is None:
            raise InvalidArgumentError(f"{word!r} is not a column name of this anonymous vocabulary")
        return position

    def _position(self, word: str) -> int | None:
        digits = word[1:]
        if word[:1] == "#" and digits.isascii() and digits.isdigit() and (digits == "0" or digits[0] != "0"):
            return int(digits) if int(digits) < self._size else None
        return None


class Vocabulary:
    """An ordered term list (column i of the BoW is ``words[i]``) and its tokenisation rules.

    Terms are words, or n-grams of up to ``rules["ngram_max"]`` words joined by one space.
    """

    def __init__(self, words: Sequence[str], *, rules: dict | None = None, min_count: int | None = None,
                 anonymous: bool = False):
        self.rules = _check_rules(dict(rules or DEFAULT_RULES))
        self.words = words if isinstance(words, _Placeholders) else tuple(words)
        self.min_count = min_count
        self.anonymous = anonymous
        self._index: dict[str, int] = {}
        if anonymous:
            return  # placeholder names: nothing to check, and no per-column objects to build
        if not self.words:
            raise VocabularyError("a vocabulary needs at least one word; the texts held none (check the text "
                                  "and tags fields, or lower min_count)")
        for i, word in enumerate(self.words):
            if not isinstance(word, str):
                raise VocabularyError(f"vocabulary word {i} is {type(word).__name__}, not str")
            if not self._is_term(word):
                raise VocabularyError(
                    f"vocabulary word {i} {word!r} is not one term under the rules {self.rules} (it tokenises "
                    f"to {tokenize(word, self.rules)}); it could never match"
                )
            if word in self._index:
                raise VocabularyError(f"vocabulary word {word!r} appears twice (at {self._index[word]} and {i})")
            self._index[word] = i

    def _is_term(self, word: str) -> bool:
        parts = word.split(" ")
        return len(parts) <= self.rules["ngram_max"] and all(
            tokenize(part, {**self.rules, "ngram_max": 1}) == [part] for part in parts)

    @classmethod
    def build(
        cls, texts: Iterable[str | bytes | Sequence[str]], *, min_count: int = 1, max_size: int | None = None,
        ngram_max: int = 1,
    ) -> "Vocabulary":
        """Terms that occur in at least ``min_count`` texts (document frequency), the
        ``max_size`` most frequent if given (ties by term), in alphabetical order."""
        if min_count < 1:
            raise InvalidArgumentError(f"min_count must be at least 1, got {min_count}")
        rules = rules_with(ngram_max=ngram_max)
        counts: Counter = Counter()
        for text in texts:
            counts.update(set(_tokens_of(text, rules)))
        kept = [(word, n) for word, n in counts.items() if n >= min_count]
        if max_size is not None:
            kept = sorted(kept, key=lambda item: (-item[1], item[0]))[:max_size]
        if not kept:
            raise VocabularyError(f"no word occurs in at least {min_count} texts ({len(counts)} distinct terms "
                                  "seen); lower min_count")
        return cls(sorted(word for word, _ in kept), rules=rules, min_count=min_count)

    @classmethod
    def from_words(cls, words: Sequence[str], rules: dict | None = None) -> "Vocabulary":
        """A vocabulary in the given column order (e.g. a dataset's published tag list)."""
        return cls(words, rules=rules)

    @classmethod
    def anonymous_of_size(cls, size: int) -> "Vocabulary":
        """``size`` columns with placeholder names ``#0``, ``#1``, ...: for data that comes as
        column indices of a word list that was never published."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise VocabularyError(f"an anonymous vocabulary needs a positive number of columns, got {size!r}")
        return cls(_Placeholders(size), anonymous=True)

    @property
    def dim(self) -> int:
        return len(self.words)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in (self.words if self.anonymous else self._index)

    def index(self, word: str) -> int:
        return self.words.index(word) if self.anonymous else self._index[word]

    def tokenize(self, text: str | bytes | Sequence[str]) -> list[str]:
        """The terms of a text or tag list under this vocabulary's rules."""
        return _tokens_of(text, self.rules)

    def columns(self, text: str | bytes | Sequence[str]) -> np.ndarray:
        """Sorted column indices (int64) of the vocabulary terms in a text or tag list."""
        if self.anonymous:
            raise TextInputError(
                "this model's vocabulary has no words (it was trained on tag indices whose words were never "
                "published): pass bag-of-words vectors or tag indices (encode_indices), not raw text"
            )
        found = {self._index[t] for t in _tokens_of(text, self.rules) if t in self._index}
        return np.array(sorted(found), dtype=np.int64)

    def encode(self, text: str | bytes | Sequence[str]) -> np.ndarray:
        """One text or tag list -> float32 (dim,) multi-hot; unknown words are dropped."""
        vector = np.zeros(self.dim, dtype=np.float32)
        vector[self.columns(text)] = 1.0
        return vector

    def encode_indices(self, indices: Iterable[int]) -> np.ndarray:
        """Tag column indices -> float32 (dim,) multi-hot."""
        idx = np.asarray(list(indices), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.dim):
            raise TextInputError(f"tag indices must lie in [0, {self.dim}), got {idx.min()}..{idx.max()}")
        vector = np.zeros(self.dim, dtype=np.float32)
        vector[idx] = 1.0
        return vector

    def encode_batch(self, texts: Any) -> np.ndarray:
        """Texts, tag lists, or a precomputed BoW array (n, dim) -> float32 (n, dim).

        A BoW array is checked (shape, values 0/1) and returned as float32.
        """
        if isinstance(texts, np.ndarray):
            return check_bow(texts, self.dim)
        if isinstance(texts, (str, bytes)):
            raise UnsupportedInputError("encode_batch takes a list of texts; use encode for a single text")
        rows = [self.encode(text) for text in texts]
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack(rows)

    def to_dict(self) -> dict:
        data = {"format": "cmhash.vocabulary", "rules": self.rules}
        if self.anonymous:
            data["anonymous_size"] = self.dim
        else:
            data["words"] = list(self.words)
        if self.min_count is not None:
            data["min_count"] = self.min_count
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "Vocabulary":
        if not isinstance(data, dict) or data.get("format") != "cmhash.vocabulary":
            raise VocabularyError("not a cmhash vocabulary (expected a JSON object with format 'cmhash.vocabulary')")
        if not isinstance(data.get("rules"), dict):
            raise VocabularyError("a vocabulary needs a 'rules' object")
        if "anonymous_size" in data:
            vocab = cls.anonymous_of_size(data["anonymous_size"])
            vocab.rules = _check_rules(data["rules"])
            return vocab
        if not isinstance(data.get("words"), list):
            raise VocabularyError("a vocabulary needs a 'words' list (or an 'anonymous_size')")
        return cls(data["words"], rules=data["rules"], min_count=data.get("min_count"))

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces, UTF-8 kept): what :attr:`fingerprint` hashes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Vocabulary":
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VocabularyError(f"vocabulary file is not valid UTF-8 JSON: {exc}") from exc
        return cls.from_dict(data)

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: equal fingerprints tokenise and order columns alike."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the canonical JSON atomically."""
        return atomic_write(path, self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        return cls.from_json(Path(path).read_bytes())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Vocabulary({self.dim} words, fingerprint={self.fingerprint[:12]})"


def _tokens_of(text: Any, rules: dict) -> list[str]:
    if isinstance(text, (str, bytes, bytearray, memoryview)):
        return tokenize(text, rules)
    if isinstance(text, (list, tuple)):
        tokens: list[str] = []
        for tag in text:
            if not isinstance(tag, (str, bytes)):
                raise UnsupportedInputError(f"tags must be str, got {type(tag).__name__} in a tag list")
            tokens.extend(tokenize(tag, rules))
        return tokens
    raise UnsupportedInputError(
        f"a text must be a str, UTF-8 bytes or a list of tag strings, got {type(text).__name__}"
    )


def check_bow(bow: Any, dim: int) -> np.ndarray:
    """A precomputed bag-of-words array -> float32 (n, dim), refusing anything but 0/1."""
    array = np.asarray(bow)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise TextInputError(f"bag-of-words vectors must have shape (n, {dim}), got {np.shape(bow)}")
    if array.dtype.kind not in "biuf":
        raise TextInputError(f"bag-of-words vectors must be numeric, got dtype {array.dtype}")
    if not np.isin(array, (0, 1)).all():
        raise TextInputError(
            "bag-of-words vectors must hold only 0 and 1 (multi-hot, as in training); counts or "
            "weights would give silently wrong codes"
        )
    return array.astype(np.float32)
