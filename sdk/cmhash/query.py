"""Queries against a collection: a bundle hashes a text or an image, an index of the codes
that bundle made answers, and the names ``cmhash encode`` recorded say which items came back.

    searcher = Searcher.open("bundle/", "photos.cmhidx")
    for hit in searcher.search_text("a dog on a beach", k=10):
        print(hit.rank, hit.distance, hit.id, hit.name)

This is the one code path of ``cmhash query`` and ``cmhash serve`` (and of
``examples/edge_search.py``). It refuses what would silently give a meaningless answer:

- a bundle and an index that do not belong together (the index records the fingerprint of
  the bundle whose codes it holds): :class:`~cmhash.errors.BundleMismatchError`;
- a text none of whose words the bundle knows (it would get the empty text's code, the same
  for every such text): :class:`~cmhash.errors.UnknownTextError`;
- an image path that does not exist: :class:`~cmhash.errors.ImageNotFoundError` (an image
  query is never read as a text);
- a k or a text over :data:`cmhash.limits.MAX_QUERY_K` / :data:`~cmhash.limits.MAX_QUERY_TEXT_CHARS`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import limits
from .errors import (ArgumentTypeError, BundleMismatchError, InvalidArgumentError, ResourceLimitError, TextInputError,
                     UncheckedIndexWarning, UnknownTextError)

__all__ = ["Hit", "Searcher", "open_index", "check_query_k"]


@dataclass(frozen=True)
class Hit:
    """One result: its rank (1 = nearest), Hamming distance, id in the index, and the name
    ``cmhash encode`` recorded for it (a path relative to the encoded folder, a manifest id),
    or None when the index holds no names."""

    rank: int
    distance: int
    id: int
    name: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def open_index(path: str | os.PathLike, mmap: bool = True):
    """The index at ``path``: one index file of any kind (flat or multi-index, as the file
    says), else a :class:`~cmhash.sharded.ShardedIndex` (a folder of shards, a JSON shard list
    or Parquet codes). ``cmhash search``, ``query`` and ``serve`` all open indexes here."""
    from .index import load_index
    from .sharded import ShardedIndex

    if Path(path).is_file() and not str(path).endswith((".json", ".parquet")):
        return load_index(path, mmap=mmap)
    return ShardedIndex.open(path, mmap=mmap)


def check_query_k(k: Any) -> int:
    """``k`` as an int in 1..MAX_QUERY_K, or a typed error that says what to change."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ArgumentTypeError(f"k must be an integer, got {k!r}")
    if k < 1:
        raise InvalidArgumentError(f"k must be at least 1, got {k}")
    if k > limits.MAX_QUERY_K:
        raise ResourceLimitError(f"k={k} is over the limit of {limits.MAX_QUERY_K} results per query; ask for fewer "
                                 "or raise cmhash.limits.MAX_QUERY_K (env CMHASH_MAX_QUERY_K)")
    return int(k)


class Searcher:
    """An encoder and an index of codes its bundle made: queries in, named hits out.

    Searches may run from several threads at once (onnxruntime sessions and the index are
    thread-safe)."""

    def __init__(self, encoder, index, where: str = "the index"):
        self.encoder = encoder
        self.index = index
        self.where = where
        self.fingerprint = _check_pair(encoder, index, where)

    @classmethod
    def open(cls, bundle: Any, index: str | os.PathLike, *, backend: str = "auto", device: str = "cpu",
             threads: int | None = None) -> "Searcher":
        """Load the bundle (a path or an :class:`~cmhash.Encoder`) and the index, and check
        that they belong together."""
        from .encoder import Encoder

        opened = open_index(index)
        encoder = bundle if isinstance(bundle, Encoder) else Encoder.load(bundle, backend=backend, device=device,
                                                                          threads=threads)
        return cls(encoder, opened, where=os.fspath(index))

    @property
    def modalities(self) -> tuple[str, ...]:
        """What this bundle can hash as a query."""
        return self.encoder.modalities

    def __len__(self) -> int:
        return len(self.index)

    # --- queries ---------------------------------------------------------------------------

    def text_code(self, text: Any) -> np.ndarray:
        """The code of a query text, or a typed error for an empty, overlong or unknown one."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise TextInputError("the query text is not UTF-8") from None
        if not isinstance(text, str):
            raise ArgumentTypeError(f"a text query is a string, got {type(text).__name__}")
        if not text.strip():
            raise TextInputError("the query text is empty; type some words")
        if len(text) > limits.MAX_QUERY_TEXT_CHARS:
            raise ResourceLimitError(f"the query text has {len(text):,} characters, over the limit of "
                                     f"{limits.MAX_QUERY_TEXT_CHARS:,}; shorten it or raise "
                                     "cmhash.limits.MAX_QUERY_TEXT_CHARS (env CMHASH_MAX_QUERY_TEXT_CHARS)")
        try:
            return self.encoder.hash_text(text, on_unknown="error")
        except UnknownTextError:
            vocabulary = self.encoder.vocabulary
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise UnknownTextError(f"no word of {shown!r} is in the bundle's vocabulary of {len(vocabulary):,} "
                                   "words, so it has no meaningful code; use words the model was trained "
                                   f"with{_examples(vocabulary)}") from None

    def image_code(self, image: Any) -> np.ndarray:
        """The code of a query image: a path (which must exist), encoded bytes, a file
        object or a PIL image."""
        if isinstance(image, str) and not image.strip():
            raise InvalidArgumentError("the image path is empty")
        return self.encoder.hash(image)

    def search_text(self, text: Any, k: int = 10, radius: int | None = None) -> list[Hit]:
        return self.search_code(self.text_code(text), k, radius)

    def search_image(self, image: Any, k: int = 10, radius: int | None = None) -> list[Hit]:
        return self.search_code(self.image_code(image), k, radius)

    def search_code(self, code: np.ndarray, k: int = 10, radius: int | None = None) -> list[Hit]:
        """The k nearest items of one packed code; with ``radius``, only those within that
        Hamming distance (inclusive), still at most k. Ordered by distance, then by position
        in the index."""
        k = check_query_k(k)
        if radius is not None:
            if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)):
                raise ArgumentTypeError(f"radius must be an integer, got {radius!r}")
            if radius < 0:
                raise InvalidArgumentError(f"radius must be at least 0, got {radius}")
        distances, ids = self.index.search(np.asarray(code, dtype=np.uint8)[None, :], k)
        keep = ids[0] >= 0
        if radius is not None:
            keep &= distances[0] <= radius
        found_ids = ids[0][keep].tolist()
        names = self.names(found_ids)
        return [Hit(rank, int(d), i, name)
                for rank, (d, i, name) in enumerate(zip(distances[0][keep].tolist(), found_ids, names), 1)]

    def names(self, ids: list[int]) -> list[str | None]:
        """The names ``cmhash encode`` recorded for ``ids`` (None where there is none)."""
        return list(self.index.names(ids)) if ids else []


def _check_pair(encoder, index, where: str) -> str | None:
    """The fingerprint both share, after checking that the index holds codes of this bundle."""
    if index.bits != encoder.bits:
        raise BundleMismatchError(f"{where} holds {index.bits}-bit codes but the bundle hashes to {encoder.bits} bits; "
                                  "query it with the bundle that encoded its collection")
    recorded = index.bundle_fingerprint
    if recorded is None:
        warnings.warn(f"{where} does not record which bundle made its codes, so nothing checks that this bundle's "
                      "queries belong in it; build it with `cmhash index build` from the codes.npz of `cmhash encode`",
                      UncheckedIndexWarning, stacklevel=3)
        return None
    if recorded != encoder.fingerprint:
        raise BundleMismatchError(f"{where} holds codes of another bundle (fingerprint {recorded[:12]}, this bundle's is "
                                  f"{encoder.fingerprint[:12]}): their codes are not comparable; query it with the "
                                  "bundle that encoded its collection, or encode the collection again with this one")
    return recorded


def _examples(vocabulary, count: int = 8) -> str:
    """A few words of the vocabulary for a message, when they are known."""
    if vocabulary.anonymous:  # placeholder names of columns, nothing a user can type
        return ""
    words = [w for w in vocabulary.words[:200] if " " not in w][:count]
    return f" (such as {', '.join(words)})" if words else ""
