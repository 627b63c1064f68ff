"""MultiIndex: exact Hamming search in sublinear time by multi-index hashing.

Each code is split into m substrings, and each substring indexes a hash table. Two codes at
Hamming distance d differ in at most floor(d / m) bits of at least one substring
(pigeonhole), so searching every table for keys within radius r of the query's substring
finds every code within m*r + m - 1 of the query. ``search`` grows r from 0 until the k-th
best distance found is within what has been guaranteed, which gives exactly the flat
scan's results (same ids, same distances, ties by insertion order). ``range_search`` looks
up keys within floor(radius / m) in every table.

Tables. Substring j is ``width[j]`` consecutive bits (at most 24) from bit ``start[j]``;
the table is direct-addressed: 2**width + 1 int32 offsets into an int32 array of the
positions of the codes, grouped by key (a CSR layout built by counting sort in C). The
number of substrings is the classic choice m = bits / log2(n), so that each table has
about one code per bucket, within the limits of 24-bit keys and 64 tables; pass
``substrings=`` to fix it. With 10 M codes of 64 bits that is 3 tables of 21-22 bits:
about 12 bytes of positions and 2 of offsets per code, next to the 8 of the code.

Changes. Codes added after the tables were built are scanned linearly next to the table
lookups, until they pass an eighth of the collection and the next search rebuilds the
tables; a removal invalidates the tables (positions shift), and the next search rebuilds
them. ``save`` writes the tables (building them first if needed), so ``load`` with
``mmap=True`` maps them from the file like the codes.

Cost model. Tables cannot beat a scan on every collection: on uniformly random codes the
near neighbours are far away, and each table lookup and candidate is a random memory
access while the scan streams. Each query's work (lookups plus candidates) is capped at
``max_work``, the number of random accesses that cost as much as scanning the collection
(``n * SCAN_COST``); a query that passes it gives up and is answered by the flat scan, and
once most of the first queries of a thread give up, the rest go straight to the scan.
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
#: Random accesses (table lookups, candidates) that cost as much as scanning one code; from
#: timings on an AMD EPYC with AVX-512 (64-bit codes: ~0.1 ns per code scanned with many
#: queries, ~10 ns per random access into a table or the codes).
SCAN_COST = 1 / 64
#: A kNN query with k above this share of the collection is answered by the scan.
MAX_K_SHARE = 1 / 64
PATHS = ("tables", "gave up (work over max_work)", "skipped (earlier queries gave up)")


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
    """The tables of codes [0, n_tab) (arrays may be read-only views of a file)."""

    def __init__(self, start, width, offsets, positions, n_tab: int):
        self.start, self.width, self.offsets, self.positions, self.n_tab = start, width, offsets, positions, n_tab

    @classmethod
    def build(cls, codes: np.ndarray, m: int) -> "_Tables":
        start, width = substring_layout(codes.shape[1] * 8, m)
        offsets = np.empty(int(((1 << width.astype(np.int64)) + 1).sum()), dtype=np.int32)
        positions = np.empty(m * codes.shape[0], dtype=np.int32)
        _hamming.mih_build(codes, start, width, offsets, positions)
        return cls(start, width, offsets, positions, codes.shape[0])

    @property
    def m(self) -> int:
        return len(self.width)

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.positions.nbytes

    def args(self):
        return self.start, self.width, self.offsets, self.positions, self.n_tab


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
        elif self._tables is not None and not self._tables.positions.flags.writeable:
            t = self._tables  # the file is let go on the first change: copy what was mapped
            self._tables = _Tables(t.start.copy(), t.width.copy(), t.offsets.copy(), t.positions.copy(), t.n_tab)

    def _stale(self) -> bool:
        t, n = self._tables, self._count
        return t is None or n - t.n_tab > max(t.n_tab // 8, 1024)

    def _build_tables(self) -> None:
        """(Re)build the tables of every code; called under the lock."""
        codes = self._codes[: self._count]
        m = self._substrings or auto_substrings(self._bits, self._count)
        self._tables = _Tables.build(np.ascontiguousarray(codes), m)

    def _search_snapshot(self):
        """Codes, ids and tables (None: scan), consistent with each other."""
        with self._lock:
            self._check_mapped_file()
            if self._count >= MIN_CODES and self._stale():
                self._build_tables()
            count = self._count
            codes, ids = self._codes[:count], self._ids[:count]
            tables = self._tables if count >= MIN_CODES else None
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
            return f"{n} codes, fewer than MIN_CODES={MIN_CODES}: a scan is as fast", 0
        max_work = max(int(n * SCAN_COST), 64)
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
                  f"{by['skipped']} were sent to the scan after most earlier ones did: the codes are too "
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
        if self._count == 0:
            return {}
        if self._tables is None or self._tables.n_tab != self._count:
            self._build_tables()
        t = self._tables
        params = {"substrings": self._substrings, "start": t.start.tolist(), "width": t.width.tolist()}
        return {b"MIHP": [json.dumps(params).encode()], b"MIHO": [_file.as_bytes(t.offsets)],
                b"MIHI": [_file.as_bytes(t.positions)]}

    def _load_extra(self, path: str, c: _file.Contents, mmap: bool, redo: str) -> None:
        s = c.sections
        if c.count == 0:
            return
        if not {b"MIHP", b"MIHO", b"MIHI"} <= s.keys():
            raise IndexFileError(f"{path}: a multi-index file without its tables (MIHP, MIHO, MIHI); {redo}")
        try:
            params = json.loads(bytes(s[b"MIHP"]).decode())
            start = np.asarray(params["start"], dtype=np.int64)
            width = np.asarray(params["width"], dtype=np.int64)
            substrings = params["substrings"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError):
            raise IndexFileError(f"{path}: the multi-index parameters (MIHP) are damaged; {redo}") from None
        m = len(width)
        ok = (start.ndim == width.ndim == 1 and len(start) == m and 1 <= m <= MAX_SUBSTRINGS
              and (width >= 1).all() and (width <= MAX_WIDTH).all() and (start >= 0).all()
              and (start + width <= c.bits).all()
              and (substrings is None or (isinstance(substrings, int) and not isinstance(substrings, bool)
                                          and substrings == m)))
        if not ok:
            raise IndexFileError(f"{path}: impossible multi-index parameters {params}; {redo}")
        sizes = (1 << width) + 1
        if len(s[b"MIHO"]) != 4 * int(sizes.sum()) or len(s[b"MIHI"]) != 4 * m * c.count:
            raise IndexFileError(f"{path}: the multi-index tables do not match {c.count} codes in {m} tables; {redo}")
        offsets = np.frombuffer(s[b"MIHO"], dtype="<i4")
        positions = np.frombuffer(s[b"MIHI"], dtype="<i4")
        ends = np.cumsum(sizes)
        firsts = offsets[ends - sizes]
        lasts = offsets[ends - 1]
        steps = np.diff(offsets)
        steps[ends[:-1] - 1] = 0  # from one table's last offset to the next's first
        if (firsts != 0).any() or (lasts != c.count).any() or (steps < 0).any() or \
                positions.min() < 0 or positions.max() >= c.count:
            raise IndexFileError(f"{path}: the multi-index tables are damaged (offsets or positions out of range); {redo}")
        if not mmap:
            offsets, positions = offsets.copy(), positions.copy()
        self._substrings = substrings
        self._tables = _Tables(start.astype(np.int32), width.astype(np.int32), offsets, positions, c.count)


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
