"""HashIndex: the flat index, an exact linear scan over every code."""

from __future__ import annotations

import numpy as np

from ..codes import as_packed
from ..search import knn_search, range_search as _range_search
from . import _file
from ._store import CodeStore

__all__ = ["HashIndex"]


def to_ids(pos: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Map result positions to ids, keeping -1 (no result) as -1."""
    out = np.full(pos.shape, -1, dtype=np.int64)
    found = pos >= 0
    out[found] = ids[pos[found]]
    return out


class HashIndex(CodeStore):
    """Exact Hamming search over packed codes, each with a unique int64 id (>= 0).

    Args:
        bits: code length, a positive multiple of 8.
        metadata: optional JSON-able dict saved with the index (at most
            ``cmhash.limits.MAX_METADATA_BYTES`` as JSON), e.g. the ``bundle_fingerprint``
            of the model that made the codes.

    Storage grows by doubling, so ``add`` is amortised O(batch). ``search`` and
    ``range_search`` are thread-safe, also while other threads ``add`` or ``remove``: each
    search works on a consistent snapshot taken under a lock (appends only write past the
    published count; removal builds new arrays), and the native search runs without the GIL.

    Searching an empty index is not an error: kNN rows are all padding (distance
    ``INT32_MAX``, id -1) and radius search finds nothing.

    Items may carry names (``add(codes, names=[...])``, :meth:`names`), kept in step through
    ``remove`` and saved with the index.

    An index loaded with ``mmap=True`` is served read-only from the file; the first
    ``add`` or ``remove`` copies it into memory (copy-on-write), the file is never written.
    The file must not be written in place while it is mapped: each search first checks
    that its size and modification time are unchanged and raises ``IndexChangedError``
    otherwise (a file truncated during a search itself can still end the process with
    SIGBUS, as with any memory-mapped file). Replacing the file by rename, as ``save``
    does, is safe: the mapping keeps the old file.
    """

    KIND = _file.KIND_FLAT

    def _queries(self, queries, func: str) -> np.ndarray:
        return as_packed(queries, func, "queries", bits=self._bits)

    def search(self, queries, k: int, threads: int | None = None):
        """The k nearest codes of each query.

        Returns:
            ``(distances, ids)``: int32 and int64, (nq, k), sorted by distance, then by
            insertion order. Rows are padded with ``INT32_MAX`` / -1 when k > len(self)
            (all padding for an empty index).

        Raises:
            CodeFormatError: queries of another bit length (the message names both).
            InvalidArgumentError: k < 1.
            ResourceLimitError: a result over ``cmhash.limits.MAX_RESULT_BYTES``.
            IndexChangedError: the file under a memory-mapped index was changed in place.
        """
        q = self._queries(queries, f"{type(self).__name__}.search")
        codes, ids = self._snapshot()
        dist, pos = knn_search(q, codes, k, threads)
        return dist, to_ids(pos, ids)

    def range_search(self, queries, radius: int, threads: int | None = None):
        """Every code within Hamming distance ``radius`` (inclusive) of each query.

        Returns:
            ``(lims, distances, ids)`` as :func:`cmhash.search.range_search`, with ids
            instead of positions.
        """
        q = self._queries(queries, f"{type(self).__name__}.range_search")
        codes, ids = self._snapshot()
        lims, dist, pos = _range_search(q, codes, radius, threads)
        return lims, dist, ids[pos]
