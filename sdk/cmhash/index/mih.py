"""MultiIndex: exact Hamming search in sublinear time by multi-index hashing.

Each code is split into m substrings, and each substring indexes a hash table. Two codes at
Hamming distance d differ in at most floor(d / m) bits of at least one substring
(pigeonhole), so searching every table for keys within radius r of the query's substring
finds every code within m*r + m - 1 of the query. ``search`` grows r from 0 until the k-th
best distance found is within what has been guaranteed, which gives exactly the flat
scan's results (same ids, same distances, ties by insertion order). ``range_search`` looks
up keys within floor(radius / m) in every table.

Tables. Substring j is ``width[j]`` consecutive bits (at most 24) from bit ``start[j]``;
each table is direct-addressed: 2**width + 1 int32 offsets delimit its buckets (a CSR
layout built by counting sort in C). The number of substrings is the classic choice
m = bits / log2(n), so that each table has about one code per bucket, within the limits of
24-bit keys and 64 tables; pass ``substrings=`` to fix it.

Layout. The codes the tables cover are numbered by *rank*, their order in table 0 (by
substring-0 key, then position): ``perm`` maps a rank to its position and ``ordered`` is a
copy of the codes in rank order. Table 0's buckets are then spans of ranks (its offsets
alone), and tables 1.. list ranks, increasing within a bucket. Candidates' codes are read
from the copy: table 0's lie side by side, and on codes with structure the others' lie
close together too (near codes share substrings), where reading them at their positions
would cost a cache miss each. Only the results' ranks go through ``perm``. With 10 M codes
of 64 bits (3 tables of 21-22 bits) that is, per code, 8 bytes of copy, 4 of perm, 8 of
ranks and 3.4 of offsets next to the 8 of the code: 3.9x the codes.

Changes. Codes added after the tables were built are scanned linearly next to the table
lookups, until they pass an eighth of the collection and the next search rebuilds the
tables; a removal invalidates the tables (positions shift), and the next search rebuilds
them. ``save`` writes the tables (building them first if needed) but not the copy, which
``load`` gathers from the codes; with ``mmap=True`` the offsets, perm and ranks are mapped
from the file like the codes, and the copy is built in memory.

Cost model. Tables cannot beat a scan on every collection: on uniformly random codes the
near neighbours are far away, and each table lookup and candidate is a random memory
access while the scan streams. Each query's work (lookups plus candidates) is capped at
``max_work``, the number of random accesses that cost as much as scanning the collection
(``n * SCAN_COST``, for 64-bit codes; in proportion to the code's bytes); a query that passes
it gives up and is answered by the flat scan, and once the first queries of a thread have
cost more than scanning would have, the rest go straight to the scan.
Small collections (``MIN_CODES``), a large k and a large radius go to the scan at once.
:meth:`MultiIndex.explain` runs a search and says which path answered and why.
"""

from __future__ import annotations

import json
import math

import numpy as np

from .. import _hamming
from ..codes import as_packed
from ..errors import ArgumentTypeError, IndexFileError, InvalidArgumentError
from ..limits import check_result_size
from ..search import _positive_int, _threads, knn_search, range_search as _range_search
from . import _file
from ._store import CodeStore
from .flat import to_ids

__all__ = ["MultiIndex"]

MAX_WIDTH = 24  # bits per substring: direct-addressed tables of 2**24 + 1 offsets at most
MAX_SUBSTRINGS = 64
#: Below this many codes the tables are not built: a scan is as fast.
MIN_CODES = 1 << 15
#: Random accesses (table lookups, candidates) that cost as much as scanning one 64-bit code,
#: in proportion for other lengths (the scan's cost grows with the bytes of a code, a
#: random access's hardly); from timings on a 2-vCPU AMD EPYC VM with AVX-512.
SCAN_COST = 1 / 256
#: A kNN query with k above this share of the collection is answered by the scan.
MAX_K_SHARE = 1 / 64
PATHS = ("tables", "gave up (work over max_work)", "skipped (earlier queries cost more than a scan)")


def substring_layout(bits: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, width) int32 arrays of m consecutive substrings covering ``bits`` bits, the
    first ``bits % m`` one bit wider."""
    width = np.full(m, bits // m, dtype=np.int32)
    width[: bits % m] += 1
    start = np.concatenate([[0], np.cumsum(width)[:-1]]).astype(np.int32)
    return start, width


def auto_substrings(bits: int, n: int) -> int:
    """m = bits / log2(n) rounded up (substrings of at most log2(n) bits: tables no larger
    than the collection), within 24-bit substrings and 64 tables."""
    m = math.ceil(bits / math.log2(max(n, 4)))
    return int(min(max(m, math.ceil(bits / MAX_WIDTH), 1), MAX_SUBSTRINGS, bits))


class _Tables:
    """The tables of codes [0, n_tab) in rank order (see the module docstring). ``offsets``,
    ``perm`` and ``ranks`` may be read-only views of a file; ``ordered`` (codes[perm]) is
    always in memory."""

    def __init__(self, start, width, offsets, perm, ranks, ordered, n_tab: int):
        self.start, self.width, self.offsets, self.n_tab = start, width, offsets, n_tab
        self.perm, self.ranks, self.ordered = perm, ranks, ordered

    @classmethod
    def build(cls, codes: np.ndarray, m: int) -> "_Tables":
        n = codes.shape[0]
        start, width = substring_layout(codes.shape[1] * 8, m)
        offsets = np.empty(int(((1 << width.astype(np.int64)) + 1).sum()), dtype=np.int32)
        perm = np.empty(n, dtype=np.int32)
        ranks = np.empty((m - 1) * n, dtype=np.int32)
        ordered = np.empty_like(codes)
        _hamming.mih_build(codes, start, width, offsets, perm, ranks, ordered)
        return cls(start, width, offsets, perm, ranks, ordered, n)

    @property
    def m(self) -> int:
        return len(self.width)

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.perm.nbytes + self.ranks.nbytes + self.ordered.nbytes

    def in_memory(self) -> "_Tables":
        """These tables with every array read from a file copied into memory."""
        own = [a if a.flags.writeable else a.copy() for a in (self.offsets, self.perm, self.ranks)]
        return _Tables(self.start, self.width, *own, self.ordered, self.n_tab)

    def args(self):
        return self.start, self.width, self.offsets, self.perm, self.ranks, self.ordered, self.n_tab


class MultiIndex(CodeStore):
    """Exact Hamming search by multi-index hashing: the results of :class:`HashIndex`, in
    time that grows slower than the collection on codes with structure (real codes, where
    near neighbours are near). Same API as ``HashIndex`` (``add``, ``remove``, ``search``,
    ``range_search``, names, metadata, ``save``/``load`` with ``mmap``), plus
    :meth:`explain`.

    Args:
        bits: code length, a positive multiple of 8, at most 1536 (64 tables of 24 bits).
        substrings: the number of tables m; None picks bits / log2(n) whenever the tables
            are built.
        metadata: as for ``HashIndex``.

    Searches fall back to the flat scan, query by query, where the tables cannot beat it
    (see the module docstring); the results are exact either way.
    """

    KIND = _file.KIND_MIH

    def __init__(self, bits: int, substrings: int | None = None, metadata: dict | None = None):
        super().__init__(bits, metadata)
        if self._bits > MAX_SUBSTRINGS * MAX_WIDTH:
            raise InvalidArgumentError(
                f"MultiIndex: bits must be at most {MAX_SUBSTRINGS * MAX_WIDTH} ({MAX_SUBSTRINGS} tables of "
                f"{MAX_WIDTH} bits), got {bits}; use HashIndex for longer codes"
            )
        if substrings is not None:
            if isinstance(substrings, bool) or not isinstance(substrings, (int, np.integer)):
                raise ArgumentTypeError(f"MultiIndex: substrings must be an int or None, got {type(substrings).__name__}")
            low = math.ceil(self._bits / MAX_WIDTH)
            if not low <= substrings <= min(MAX_SUBSTRINGS, self._bits):
                raise InvalidArgumentError(
                    f"MultiIndex: substrings must be within {low}..{min(MAX_SUBSTRINGS, self._bits)} for "
                    f"{self._bits}-bit codes (substrings of at most {MAX_WIDTH} bits), got {substrings}"
                )
            substrings = int(substrings)
        self._substrings = substrings
        self._tables: _Tables | None = None

    @property
    def substrings(self) -> int | None:
        """The number of tables asked for (None: chosen from the collection's size)."""
        return self._substrings

    @property
    def table_bytes(self) -> int:
        """Bytes held by the tables now (0 before they are built)."""
        tables = self._tables
        return tables.nbytes if tables is not None else 0

    # -- tables ----------------------------------------------------------------------
    def _changed(self, removed: bool) -> None:
        if removed:
            self._tables = None  # positions shifted
        elif self._tables is not None:
            self._tables = self._tables.in_memory()  # the file is let go on the first change

    def build_tables(self) -> None:
        """Build the tables now, rather than in the first search that needs them (a
        collection below ``MIN_CODES`` gets none: it is always scanned)."""
        with self._lock:
            self._check_mapped_file()
            if self._count >= MIN_CODES and self._stale():
                self._build_tables()

    def _layout(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The substrings the tables would have now; None when, with the number of tables
        left to the index, their offsets alone would outweigh the collection (long codes
        in a small collection): it is then scanned. A number given is always honoured."""
        m = self._substrings or auto_substrings(self._bits, self._count)
        start, width = substring_layout(self._bits, m)
        if self._substrings is None and int(((1 << width.astype(np.int64)) + 1).sum()) > 4 * self._count + (1 << 20):
            return None
        return start, width

    def _stale(self) -> bool:
        t, n = self._tables, self._count
        return t is None or n - t.n_tab > max(t.n_tab // 8, 1024)

    def _build_tables(self) -> None:
        """(Re)build the tables of every code, if they fit (see _layout); under the lock."""
        layout = self._layout()
        self._tables = None if layout is None else _Tables.build(self._codes[: self._count], len(layout[0]))

    def _search_snapshot(self):
        """Codes, ids and tables (None: scan), consistent with each other."""
        with self._lock:
            self._check_mapped_file()
            if self._count >= MIN_CODES and self._stale():
                self._build_tables()
            count = self._count
            codes, ids = self._codes[:count], self._ids[:count]
            tables = self._tables if count >= MIN_CODES and not self._stale() else None
        return codes, ids, tables

    # -- search ----------------------------------------------------------------------
    def search(self, queries, k: int, threads: int | None = None):
        """The k nearest codes of each query: exactly :meth:`HashIndex.search`'s results.

        Returns:
            ``(distances, ids)``: int32 and int64, (nq, k), sorted by distance, then by
            insertion order, padded with ``INT32_MAX`` / -1 when k > len(self).
        """
        return self._knn(queries, k, threads, "MultiIndex.search")[:2]

    def range_search(self, queries, radius: int, threads: int | None = None):
        """Every code within Hamming distance ``radius`` (inclusive) of each query: exactly
        :meth:`HashIndex.range_search`'s results (``lims``, distances, ids)."""
        return self._range(queries, radius, threads, "MultiIndex.range_search")[:3]

    def explain(self, queries, k: int | None = None, radius: int | None = None, threads: int | None = None) -> dict:
        """Run ``search(queries, k)`` (or ``range_search(queries, radius)``) and say how it was
        answered: ``path`` ("tables", "scan" or "mixed"), ``reason``, how many queries the
        tables answered, gave up on or skipped, the mean table lookups and candidates per
        query, the tables' layout and sizes."""
        if (k is None) == (radius is None):
            raise InvalidArgumentError("MultiIndex.explain: give exactly one of k and radius")
        if k is not None:
            return self._knn(queries, k, threads, "MultiIndex.explain")[2]
        return self._range(queries, radius, threads, "MultiIndex.explain")[3]

    def _plan(self, tables, n: int, k: int | None = None, radius: int | None = None) -> tuple[str | None, int]:
        """(why the tables are not used, or None; the work cap per query)."""
        if tables is None:
            if n < MIN_CODES:
                return f"{n} codes, fewer than MIN_CODES={MIN_CODES}: a scan is as fast", 0
            return (f"no tables: {self._bits}-bit codes need tables larger than the {n} codes "
                    "themselves; a scan is as fast"), 0
        max_work = max(int(n * SCAN_COST * self.nbytes / 8), 64)
        if k is not None and k > n * MAX_K_SHARE:
            return f"k={k} is more than {MAX_K_SHARE:.4g} of the {n} codes: a scan is as fast", max_work
        if radius is not None:
            lookups = sum(sum(math.comb(int(w), i) for i in range(min(radius // tables.m, int(w)) + 1))
                          for w in tables.width)
            if lookups > max_work:
                return (f"radius {radius} needs {lookups} table lookups per query, more than the "
                        f"{max_work} that cost as much as a scan"), max_work
        return None, max_work

    def _report(self, tables, n: int, nq: int, reason: str | None, max_work: int, stats) -> dict:
        report = {"codes": n, "queries": nq, "max_work": max_work,
                  "substrings": tables.m if tables is not None else None,
                  "widths": tables.width.tolist() if tables is not None else None,
                  "table_bytes": tables.nbytes if tables is not None else 0,
                  "code_bytes": n * self.nbytes}
        if reason is not None or stats is None:
            return {"path": "scan", "reason": reason, "by_tables": 0, "gave_up": 0, "skipped": 0, **report}
        paths = stats[:, 0]
        by = {name: int((paths == i).sum()) for i, name in enumerate(("by_tables", "gave_up", "skipped"))}
        path = "tables" if by["by_tables"] == nq else "scan" if by["by_tables"] == 0 else "mixed"
        reason = ("every query within its work cap" if path == "tables" else
                  f"{by['gave_up']} queries passed the work cap of {max_work} (as much as a scan) and "
                  f"{by['skipped']} were sent to the scan once the earlier ones had cost more than scanning: the codes are too "
                  "spread out for the tables here")
        tried = paths != 2
        return {"path": path, "reason": reason, **by,
                "lookups_mean": float(stats[tried, 1].mean()) if tried.any() else 0.0,
                "candidates_mean": float(stats[tried, 2].mean()) if tried.any() else 0.0, **report}

    def _knn(self, queries, k, threads, func):
        q = as_packed(queries, func, "queries", bits=self._bits)
        k = _positive_int(k, func, "k", 1)
        nthreads = _threads(threads, func)
        check_result_size(func, f"{q.shape[0]} queries x k={k}, 12 bytes each", q.shape[0] * k * 12)
        codes, ids, tables = self._search_snapshot()
        n, nq = codes.shape[0], q.shape[0]
        reason, max_work = self._plan(tables, n, k=k)
        stats = None
        if reason is not None:
            dist, pos = knn_search(q, codes, k, threads)
        else:
            dist = np.empty((nq, k), dtype=np.int32)
            pos = np.empty((nq, k), dtype=np.int64)
            stats = np.empty((nq, 3), dtype=np.int64)
            _hamming.mih_knn(q, codes, *tables.args(), k, max_work, dist, pos, stats, nthreads)
            rest = stats[:, 0] != 0
            if rest.any():
                dist[rest], pos[rest] = knn_search(q[rest], codes, k, threads)
        return dist, to_ids(pos, ids), self._report(tables, n, nq, reason, max_work, stats)

    def _range(self, queries, radius, threads, func):
        q = as_packed(queries, func, "queries", bits=self._bits)
        radius = min(_positive_int(radius, func, "radius", 0), self._bits)
        nthreads = _threads(threads, func)
        codes, ids, tables = self._search_snapshot()
        n, nq = codes.shape[0], q.shape[0]
        reason, max_work = self._plan(tables, n, radius=radius)
        stats = None
        if reason is not None:
            lims, dist, pos = _range_search(q, codes, radius, threads)
        else:
            raw = _hamming.mih_range(q, codes, *tables.args(), radius, max_work, nthreads)
            lims, dist, pos = (np.frombuffer(raw[0], np.int64), np.frombuffer(raw[1], np.int32),
                               np.frombuffer(raw[2], np.int64))
            stats = np.frombuffer(raw[3], np.int64).reshape(nq, 3)
            rest = np.flatnonzero(stats[:, 0] != 0)
            if rest.size:
                lims, dist, pos = _merge_ranges(lims, dist, pos, rest, _range_search(q[rest], codes, radius, threads))
        return lims, dist, ids[pos], self._report(tables, n, nq, reason, max_work, stats)

    # -- persistence -----------------------------------------------------------------
    def _extra_sections(self) -> dict:
        if self._count == 0 or self._layout() is None:
            return {}  # no tables to save: the loaded index scans, or builds them when it grows
        if self._tables is None or self._tables.n_tab != self._count:
            self._build_tables()
        t = self._tables
        params = {"substrings": self._substrings, "start": t.start.tolist(), "width": t.width.tolist()}
        # The copy of the codes is not saved: load gathers it from the codes through perm.
        return {b"MIHP": [json.dumps(params).encode()], b"MIHO": [_file.as_bytes(t.offsets)],
                b"MIHR": [_file.as_bytes(t.perm), _file.as_bytes(t.ranks)]}

    def _load_extra(self, path: str, c: _file.Contents, mmap: bool, redo: str) -> None:
        s = c.sections
        present = {b"MIHP", b"MIHO", b"MIHR", b"MIHI"} & s.keys()
        if not present:
            return  # saved without tables (see _extra_sections): built when needed
        if len(present) != 3 or not {b"MIHP", b"MIHO"} <= present or c.count == 0:
            raise IndexFileError(f"{path}: a multi-index file with part of its tables, or both layouts "
                                 f"({sorted(present)}); {redo}")
        tag = b"MIHR" if b"MIHR" in present else b"MIHI"
        try:
            params = json.loads(bytes(s[b"MIHP"]).decode())
            start = np.asarray(params["start"], dtype=np.int64)
            width = np.asarray(params["width"], dtype=np.int64)
            substrings = params["substrings"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError):
            raise IndexFileError(f"{path}: the multi-index parameters (MIHP) are damaged; {redo}") from None
        m, n = len(width), c.count
        ok = (start.ndim == width.ndim == 1 and len(start) == m and 1 <= m <= MAX_SUBSTRINGS
              and (width >= 1).all() and (width <= MAX_WIDTH).all() and (start >= 0).all()
              and (start + width <= c.bits).all()
              and (substrings is None or (isinstance(substrings, int) and not isinstance(substrings, bool)
                                          and substrings == m)))
        if not ok:
            raise IndexFileError(f"{path}: impossible multi-index parameters {params}; {redo}")
        sizes = (1 << width) + 1
        if len(s[b"MIHO"]) != 4 * int(sizes.sum()) or len(s[tag]) != 4 * m * n:
            raise IndexFileError(f"{path}: the multi-index tables do not match {n} codes in {m} tables; {redo}")
        offsets = np.frombuffer(s[b"MIHO"], dtype="<i4")
        entries = np.frombuffer(s[tag], dtype="<i4")  # MIHR: perm, then ranks; MIHI: positions
        ends = np.cumsum(sizes)
        firsts = offsets[ends - sizes]
        lasts = offsets[ends - 1]
        steps = np.diff(offsets)
        steps[ends[:-1] - 1] = 0  # from one table's last offset to the next's first
        perm = entries[:n]
        if (firsts != 0).any() or (lasts != n).any() or (steps < 0).any() or \
                entries.min() < 0 or entries.max() >= n or not _is_permutation(perm):
            raise IndexFileError(f"{path}: the multi-index tables are damaged (offsets out of order, or ranks or "
                                 f"positions out of range or repeated); {redo}")
        # MIHI lists positions in every table: table 0's are perm, the others become ranks.
        ranks = entries[n:] if tag == b"MIHR" else _positions_to_ranks(entries[n:], perm, offsets, sizes)
        ordered = np.take(c.codes, perm, axis=0)  # several times faster than c.codes[perm]
        tables = _Tables(start.astype(np.int32), width.astype(np.int32), offsets, perm, ranks, ordered, n)
        self._substrings = substrings
        self._tables = tables if mmap else tables.in_memory()


def _is_permutation(perm: np.ndarray) -> bool:
    """Whether perm (values within 0..len) holds each of them once."""
    hit = np.zeros(len(perm), dtype=bool)
    hit[perm] = True
    return bool(hit.all())


def _positions_to_ranks(positions: np.ndarray, perm: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Tables 1.. given as positions, as ranks in increasing order within each bucket (the
    layout a build gives)."""
    n = len(perm)
    rank_of = np.empty(n, dtype=np.int64)
    rank_of[perm] = np.arange(n)
    ranks = np.empty(len(positions), dtype=np.int32)
    bases = np.cumsum(sizes) - sizes
    for j in range(1, len(sizes)):
        off = offsets[bases[j] : bases[j] + sizes[j]]
        bucket = np.repeat(np.arange(sizes[j] - 1, dtype=np.int64), np.diff(off))
        keys = bucket << 32 | rank_of[positions[(j - 1) * n : j * n]]
        keys.sort()
        ranks[(j - 1) * n : j * n] = keys & 0xFFFFFFFF
    return ranks


def _merge_ranges(lims, dist, pos, rest: np.ndarray, scanned):
    """Put the scan's results for queries ``rest`` (which have none yet) into a CSR result."""
    s_lims, s_dist, s_pos = scanned
    counts = np.diff(lims)
    counts[rest] = np.diff(s_lims)
    new_lims = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    from_scan = np.zeros(len(counts), dtype=bool)
    from_scan[rest] = True
    # Each hit's source index: hits of table-answered queries in order, then the scan's.
    take_dist = np.empty(int(new_lims[-1]), dtype=np.int32)
    take_pos = np.empty(int(new_lims[-1]), dtype=np.int64)
    keep_rows = np.repeat(~from_scan, counts)
    take_dist[keep_rows], take_pos[keep_rows] = dist, pos
    take_dist[~keep_rows], take_pos[~keep_rows] = s_dist, s_pos
    return new_lims, take_dist, take_pos
