"""ShardedIndex: several indexes searched as one, with results exactly those of one index over
their union.

    index = ShardedIndex.open("shards/")              # every *.cmhidx and *.parquet, by name
    index = ShardedIndex.open("shards.json")          # a shard list (below)
    index = ShardedIndex.open(["a.cmhidx", "b.cmhidx", "c/parts/"])
    dist, ids = index.search(queries, k=10)

A shard is an index file (memory-mapped: opening costs one checksum pass, not a copy) or
Parquet codes (a file or a folder of parts, read into memory: Parquet pages are decoded). A
shard list is a JSON file; relative paths are taken from the list's folder::

    {"format": "cmhash-shards/1", "shards": ["part-0.cmhidx", "part-1.cmhidx"]}

Results are merged exactly: by distance, then shard, then position in the shard, which is
the order one :class:`~cmhash.index.HashIndex` over the shards' codes, concatenated in shard
order, gives (its ties go by insertion order). Ids must be unique across shards, as in one
index (checked when opening).

A distributed service can search each shard where it lives with :meth:`ShardedIndex.search_shard`
(or a plain ``HashIndex.search``) and combine the answers, in shard order, with
:func:`merge_results` / :func:`merge_range_results`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .codefiles import is_parquet
from .errors import CodeFormatError, IndexFileError, InvalidArgumentError
from .index import HashIndex, _first_duplicate

__all__ = ["ShardedIndex", "merge_results", "merge_range_results", "SHARDS_FORMAT", "shard_paths"]

SHARDS_FORMAT = "cmhash-shards/1"
INDEX_SUFFIX = ".cmhidx"


def shard_paths(source) -> list[str]:
    """The shard paths ``source`` names: a list of paths as given; a ``.json`` shard list; a
    folder: its ``*.cmhidx`` files and ``*.parquet`` files in name order; any other path:
    itself (one shard)."""
    if isinstance(source, (list, tuple)):
        paths = [os.fspath(p) for p in source]
    else:
        path = os.fspath(source)
        if path.endswith(".json"):
            paths = _read_shard_list(Path(path))
        elif os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith((INDEX_SUFFIX, ".parquet")) and not n.startswith("."))
            if not names:
                raise IndexFileError(f"{path}: the folder holds no {INDEX_SUFFIX} or .parquet shards")
            paths = [os.path.join(path, n) for n in names]
        else:
            paths = [path]
    if not paths:
        raise InvalidArgumentError("ShardedIndex: no shards given")
    return paths


def _read_shard_list(path: Path) -> list[str]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexFileError(f"{path}: not a readable shard list ({exc})") from None
    shards = doc.get("shards") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("format") != SHARDS_FORMAT or not isinstance(shards, list) \
            or not all(isinstance(s, str) and s for s in shards):
        raise IndexFileError(f'{path}: a shard list is {{"format": "{SHARDS_FORMAT}", "shards": ["a.cmhidx", ...]}}')
    return [str(path.parent / s) for s in shards]


def _open_shard(path: str, mmap: bool) -> HashIndex:
    if is_parquet(path):
        return HashIndex.from_codes_file(path)
    return HashIndex.load(path, mmap=mmap)


class ShardedIndex:
    """Exact search over several :class:`~cmhash.index.HashIndex` shards of one bit length.

    Args:
        shards: the shards, in order (the order decides ties).
        paths: where they came from (for messages), when opened from files.
        check_ids: refuse ids that occur in two shards (one index could not hold them).
    """

    def __init__(self, shards: Sequence[HashIndex], paths: Sequence[str] | None = None, check_ids: bool = True):
        shards = list(shards)
        if not shards:
            raise InvalidArgumentError("ShardedIndex: no shards given")
        self.paths = [str(p) for p in paths] if paths is not None else [f"shard {i}" for i in range(len(shards))]
        bits = shards[0].bits
        for path, shard in zip(self.paths, shards):
            if shard.bits != bits:
                raise CodeFormatError(f"ShardedIndex: {self.paths[0]} holds {bits}-bit codes but {path} holds "
                                      f"{shard.bits}-bit codes; all shards must come from one code space")
        if check_ids and len(shards) > 1:
            dup = _first_duplicate(np.concatenate([s.ids for s in shards]))
            if dup is not None:
                where = [p for p, s in zip(self.paths, shards) if np.isin(dup, s.ids)]
                raise InvalidArgumentError(f"ShardedIndex: id {dup} is in several shards ({', '.join(where)}); "
                                           "ids must be unique across shards, as in one index")
        self.shards = tuple(shards)
        self._bits = bits

    @classmethod
    def open(cls, paths, *, mmap: bool = True, check_ids: bool = True) -> "ShardedIndex":
        """Open shards from files: a list of paths, a folder, a ``.json`` shard list or one path
        (see :func:`shard_paths`). Index files are memory-mapped unless ``mmap=False``."""
        found = shard_paths(paths)
        return cls([_open_shard(p, mmap) for p in found], found, check_ids)

    @property
    def bits(self) -> int:
        return self._bits

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def __repr__(self) -> str:
        return f"ShardedIndex(bits={self._bits}, shards={len(self.shards)}, len={len(self)})"

    def search_shard(self, i: int, queries, k: int, threads: int | None = None):
        """``(distances, ids)`` of shard ``i`` alone, ready for :func:`merge_results`."""
        return self.shards[i].search(queries, k, threads)

    def range_search_shard(self, i: int, queries, radius: int, threads: int | None = None):
        """``(lims, distances, ids)`` of shard ``i`` alone, ready for :func:`merge_range_results`."""
        return self.shards[i].range_search(queries, radius, threads)

    def search(self, queries, k: int, threads: int | None = None):
        """The k nearest codes over all shards: ``(distances, ids)`` as ``HashIndex.search``."""
        return merge_results([self.search_shard(i, queries, k, threads) for i in range(len(self.shards))], k)

    def range_search(self, queries, radius: int, threads: int | None = None):
        """Every code within ``radius`` over all shards: ``(lims, distances, ids)`` as ``HashIndex.range_search``."""
        return merge_range_results([self.range_search_shard(i, queries, radius, threads)
                                    for i in range(len(self.shards))])


def merge_results(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int):
    """Merge per-shard kNN results, given in shard order, into the k best of all.

    Each result is ``(distances, ids)``, (nq, k_i), rows sorted by distance then position
    (as ``HashIndex.search`` returns them, padding included). The merge is a stable sort by
    distance, so ties keep shard order, then position: the answer of one index over all
    shards' codes concatenated in shard order. Rows are padded with ``INT32_MAX`` / -1 when
    the shards hold fewer than k codes together.
    """
    if not results:
        raise InvalidArgumentError("merge_results: no shard results given")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidArgumentError(f"merge_results: k must be an int >= 1, got {k!r}")
    dists = [np.asarray(d, dtype=np.int32) for d, _ in results]
    ids = [np.asarray(i, dtype=np.int64) for _, i in results]
    nq = dists[0].shape[0]
    for d, i in zip(dists, ids):
        if d.ndim != 2 or d.shape != i.shape or d.shape[0] != nq:
            raise InvalidArgumentError("merge_results: every shard result must be (distances, ids) of shape "
                                       f"(nq, k) with one nq; got {d.shape} and {i.shape}")
    dist = np.concatenate(dists, axis=1)
    idx = np.concatenate(ids, axis=1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(dist, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    if dist.shape[1] < k:  # the shards' rows are fewer than k: pad as a search does
        pad = k - dist.shape[1]
        dist = np.concatenate([dist, np.full((nq, pad), np.iinfo(np.int32).max, np.int32)], axis=1)
        idx = np.concatenate([idx, np.full((nq, pad), -1, np.int64)], axis=1)
    return np.ascontiguousarray(dist), np.ascontiguousarray(idx)


def merge_range_results(results: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Merge per-shard range results, given in shard order: ``(lims, distances, ids)`` each, as
    ``HashIndex.range_search`` returns them. Each query's hits are sorted by distance, then
    shard, then position, as one index over all shards would sort them."""
    if not results:
        raise InvalidArgumentError("merge_range_results: no shard results given")
    lims = [np.asarray(r[0], dtype=np.int64) for r in results]
    nq = lims[0].shape[0] - 1
    if any(lim.ndim != 1 or lim.shape[0] != nq + 1 for lim in lims):
        raise InvalidArgumentError("merge_range_results: every shard's lims must have nq + 1 entries, for one nq")
    counts = sum(np.diff(lim) for lim in lims)
    out_lims = np.zeros(nq + 1, dtype=np.int64)
    np.cumsum(counts, out=out_lims[1:])
    # each hit's query: sorting by (query, distance) with a stable sort over shard order
    # leaves shard, then position, as the tie order
    query_of = np.concatenate([np.repeat(np.arange(nq), np.diff(lim)) for lim in lims])
    dist = np.concatenate([np.asarray(r[1], dtype=np.int32) for r in results])
    ids = np.concatenate([np.asarray(r[2], dtype=np.int64) for r in results])
    order = np.lexsort((dist, query_of))  # lexsort is stable
    return out_lims, dist[order], ids[order]
