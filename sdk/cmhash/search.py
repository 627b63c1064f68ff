"""Exact search in Hamming space over packed codes (see :mod:`cmhash.codes`).

The work is done by the native module ``cmhash._hamming`` with the GIL released, so
searches from several Python threads run in parallel.

- :func:`hamming_distances`: the full (nq, n) distance matrix, for small inputs.
- :func:`knn_search`: the k nearest database codes of each query, ties broken by database
  position, in O(nq*k) memory.
- :func:`range_search`: every database code within a Hamming radius (inclusive).
"""

from __future__ import annotations

import numpy as np

from . import _hamming
from .codes import as_packed
from .errors import ArgumentTypeError, InvalidArgumentError
from .limits import check_result_size

__all__ = ["hamming_distances", "knn_search", "range_search"]


def _threads(threads, func: str) -> int:
    if threads is None:
        return 0  # the native side reads 0 as "all CPUs"
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise ArgumentTypeError(f"{func}: threads must be an int or None, got {type(threads).__name__}")
    if threads < 1:
        raise InvalidArgumentError(f"{func}: threads must be >= 1 (or None for all CPUs), got {threads}")
    return int(threads)


def _pair(queries, db, func: str):
    q = as_packed(queries, func, "queries")
    d = as_packed(db, func, "db", bits=q.shape[1] * 8)
    return q, d


def _positive_int(value, func: str, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{func}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise InvalidArgumentError(f"{func}: {name} must be >= {minimum}, got {value}")
    return int(value)


def hamming_distances(queries, db, threads: int | None = None) -> np.ndarray:
    """Hamming distance of every query to every database code.

    Args:
        queries: packed uint8 codes (nq, nbytes), or one code (nbytes,).
        db: packed uint8 codes (n, nbytes) of the same length.
        threads: worker threads; None = all CPUs.

    Returns:
        int32 array (nq, n). This is nq*n integers: use :func:`knn_search` or
        :func:`range_search` for large inputs.

    Raises:
        CodeFormatError: codes that are not packed uint8 or of different lengths.
    """
    q, d = _pair(queries, db, "hamming_distances")
    check_result_size("hamming_distances", f"{q.shape[0]} x {d.shape[0]} int32 distances", q.shape[0] * d.shape[0] * 4)
    out = np.empty((q.shape[0], d.shape[0]), dtype=np.int32)
    _hamming.distances(q, d, out, _threads(threads, "hamming_distances"))
    return out


def knn_search(queries, db, k: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by Hamming distance.

    Args:
        queries: packed uint8 codes (nq, nbytes), or one code (nbytes,).
        db: packed uint8 codes (n, nbytes) of the same length.
        k: neighbours per query, >= 1. When k > n, rows are padded with distance
            ``INT32_MAX`` and label -1 (as FAISS does).
        threads: worker threads; None = all CPUs. With fewer queries than threads, the
            database is split over the threads instead.

    Returns:
        ``(D, I)``: int32 distances and int64 database positions, both (nq, k), each row
        sorted by distance, then position.

    Raises:
        CodeFormatError: codes that are not packed uint8 or of different lengths.
        InvalidArgumentError: k < 1.
        ResourceLimitError: a result over ``cmhash.limits.MAX_RESULT_BYTES``.
    """
    q, d = _pair(queries, db, "knn_search")
    k = _positive_int(k, "knn_search", "k", 1)
    check_result_size("knn_search", f"{q.shape[0]} queries x k={k}, 12 bytes each", q.shape[0] * k * 12)
    distances = np.empty((q.shape[0], k), dtype=np.int32)
    labels = np.empty((q.shape[0], k), dtype=np.int64)
    _hamming.knn(q, d, k, distances, labels, _threads(threads, "knn_search"))
    return distances, labels


def range_search(queries, db, radius: int, threads: int | None = None):
    """Every database code within Hamming distance ``radius`` of each query, inclusive.

    ``distance <= radius`` is the hashing literature's "within Hamming radius r". FAISS's
    ``IndexBinaryFlat.range_search`` is strict (``distance < radius``): pass ``radius - 1``
    here to get its results.

    Returns:
        ``(lims, D, I)``: lims int64 (nq + 1); the hits of query i are
        ``D[lims[i]:lims[i+1]]`` (int32 distances) and ``I[lims[i]:lims[i+1]]`` (int64
        database positions), sorted by distance, then position.

    Raises:
        CodeFormatError: codes that are not packed uint8 or of different lengths.
        InvalidArgumentError: radius < 0.
    """
    q, d = _pair(queries, db, "range_search")
    radius = _positive_int(radius, "range_search", "radius", 0)
    radius = min(radius, q.shape[1] * 8)  # any larger radius finds everything, as this does
    lims, dist, labels = _hamming.range_search(q, d, radius, _threads(threads, "range_search"))
    return (
        np.frombuffer(lims, dtype=np.int64),
        np.frombuffer(dist, dtype=np.int32),
        np.frombuffer(labels, dtype=np.int64),
    )
