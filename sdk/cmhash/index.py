"""HashIndex: a flat index of packed binary codes with ids, exact Hamming search, and a
checksummed binary file format.

File format (version 1.0), all integers little-endian::

    offset size  field
    0      8     magic b"CMHIDX\\x00\\x01"
    8      2     format major version (1); readers refuse majors they do not know
    10     2     format minor version (0); additions a 1.x reader may ignore
    12     4     flags (0; no flags are defined yet, readers refuse unknown ones)
    16     4     bits per code (a positive multiple of 8)
    20     4     payload offset (64)
    24     8     count: number of codes
    32     8     next automatic id
    40     8     payload length in bytes
    48     4     CRC-32 (zlib) of the payload
    52     8     reserved, zero
    60     4     CRC-32 (zlib) of header bytes 0..59
    64     ...   payload: codes (count x bits/8 bytes, row-major), zero padding up to a
                 multiple of 64 bytes, then ids (count x int64)

The payload starts at 64 and the ids at a multiple of 64, so ``load(path, mmap=True)``
maps both read-only without copying. Saves are atomic (temporary file in the same
directory, fsync, ``os.replace``, fsync of the directory): a crash or a kill during a save
leaves the previous file intact. No pickle is involved anywhere.
"""

from __future__ import annotations

import mmap as _mmap
import os
import struct
import threading
import zlib

import numpy as np

from . import _hamming
from .codes import as_packed, check_bits
from .errors import ArgumentTypeError, CodeFormatError, IndexChangedError, IndexFileError, IndexFullError, InvalidArgumentError
from .files import atomic_write
from .search import knn_search, range_search as _range_search

__all__ = ["HashIndex"]

MAGIC = b"CMHIDX\x00\x01"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0
SUPPORTED_MAJORS = (1,)
_HEADER = struct.Struct("<8sHHIIIQQQI8s")  # everything up to the header CRC: 60 bytes
HEADER_SIZE = 64
ALIGN = 64
_MAX_BITS = _hamming.sysinfo()["max_bits"]
_CHUNK = 1 << 24  # bytes per write/CRC step, so saving never copies the whole index
_MAX_ID = np.iinfo(np.int64).max


def _pad(n: int) -> int:
    return -n % ALIGN


def _as_ids(ids, n: int | None, func: str, allow_negative: bool = False) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise InvalidArgumentError(f"{func}: ids must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ArgumentTypeError(f"{func}: ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > _MAX_ID:
        raise InvalidArgumentError(f"{func}: ids must fit in int64")
    arr = arr.astype(np.int64)
    if n is not None and arr.shape[0] != n:
        raise InvalidArgumentError(f"{func}: got {arr.shape[0]} ids for {n} codes")
    if not allow_negative and arr.size and arr.min() < 0:
        raise InvalidArgumentError(f"{func}: ids must be >= 0 (-1 marks 'no result' in search output), got {arr.min()}")
    return arr


def _first_duplicate(ids: np.ndarray) -> int | None:
    srt = np.sort(ids)  # sorting beats np.unique's hashing on large int64 arrays
    dup = srt[1:][srt[1:] == srt[:-1]]
    return int(dup[0]) if dup.size else None


def _member(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of ``ids`` are in the sorted array ``sorted_ids``."""
    if not sorted_ids.size:
        return np.zeros(ids.shape, dtype=bool)
    pos = np.searchsorted(sorted_ids, ids).clip(max=sorted_ids.size - 1)
    return sorted_ids[pos] == ids


class _IdSet:
    """The ids of an index, for duplicate checks, in about 8 bytes per id (a Python set of
    ints costs 60-70). One sorted array plus a sorted tail of recent additions; the tail is
    merged in when it outgrows a bound, so an add costs O(tail) and merges stay rare."""

    TAIL = 1 << 16

    def __init__(self, ids: np.ndarray):
        self._base = np.sort(ids)
        self._tail = np.empty(0, np.int64)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return _member(self._base, ids) | _member(self._tail, ids)

    def add(self, ids: np.ndarray) -> None:
        tail = np.sort(np.concatenate([self._tail, ids]))
        if tail.size > max(self.TAIL, self._base.size // 8):
            self._base, tail = np.sort(np.concatenate([self._base, tail]), kind="stable"), tail[:0]  # two sorted runs: a merge
        self._tail = tail

    def discard(self, ids: np.ndarray) -> None:
        self._base = self._base[~np.isin(self._base, ids)]
        self._tail = self._tail[~np.isin(self._tail, ids)]


class HashIndex:
    """Exact Hamming search over packed codes, each with a unique int64 id (>= 0).

    Args:
        bits: code length, a positive multiple of 8.

    Storage grows by doubling, so ``add`` is amortised O(batch). ``search`` and
    ``range_search`` are thread-safe, also while other threads ``add`` or ``remove``: each
    search works on a consistent snapshot taken under a lock (appends only write past the
    published count; removal builds new arrays), and the native search runs without the GIL.

    Searching an empty index is not an error: kNN rows are all padding (distance
    ``INT32_MAX``, id -1) and radius search finds nothing.

    An index loaded with ``mmap=True`` is served read-only from the file; the first
    ``add`` or ``remove`` copies it into memory (copy-on-write), the file is never written.
    The file must not be written in place while it is mapped: each search first checks
    that its size and modification time are unchanged and raises ``IndexChangedError``
    otherwise (a file truncated during a search itself can still end the process with
    SIGBUS, as with any memory-mapped file). Replacing the file by rename, as ``save``
    does, is safe: the mapping keeps the old file.
    """

    def __init__(self, bits: int):
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
            raise ArgumentTypeError(f"HashIndex: bits must be an int, got {type(bits).__name__}")
        check_bits(bits, "HashIndex: bits", InvalidArgumentError)
        if bits > _MAX_BITS:
            raise InvalidArgumentError(f"HashIndex: bits must be at most {_MAX_BITS}, got {bits}")
        self._bits = int(bits)
        self._lock = threading.Lock()
        self._codes = np.empty((0, self._bits // 8), dtype=np.uint8)  # capacity rows
        self._ids = np.empty(0, dtype=np.int64)
        self._count = 0
        self._next_id = 0
        self._id_set: _IdSet | None = None  # built on the first add or remove
        self._mapped = False  # arrays are read-only views of a file
        self._mapped_file: tuple | None = None  # (fd, stat identity) of the mapped file

    # -- properties ------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self._bits

    @property
    def nbytes(self) -> int:
        """Bytes per code (bits / 8)."""
        return self._bits // 8

    @property
    def codes(self) -> np.ndarray:
        """Read-only view of the codes (len, nbytes), in insertion order."""
        codes, _ = self._snapshot()
        return codes

    @property
    def ids(self) -> np.ndarray:
        """Read-only view of the ids (len,), aligned with :attr:`codes`."""
        _, ids = self._snapshot()
        return ids

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"HashIndex(bits={self._bits}, len={self._count}{', mmap' if self._mapped else ''})"

    def _snapshot(self):
        with self._lock:
            self._check_mapped_file()
            codes = self._codes[: self._count]
            ids = self._ids[: self._count]
        codes = codes.view()
        ids = ids.view()
        codes.flags.writeable = False
        ids.flags.writeable = False
        return codes, ids

    def _ensure_id_set(self) -> _IdSet:
        if self._id_set is None:
            self._id_set = _IdSet(self._ids[: self._count])
        return self._id_set

    def _check_mapped_file(self) -> None:
        # A memory-mapped file changed in place would give other results, and one truncated
        # would kill the process with SIGBUS: refuse to read it. A file replaced by rename
        # (as save() does) is safe, since the mapping keeps the old file. Called under the lock.
        if self._mapped_file is not None:
            fd, identity = self._mapped_file
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != identity:
                raise IndexChangedError(
                    "HashIndex: the file under this memory-mapped index was modified or truncated after "
                    "loading; never write an index file in place (save to a new file, or let HashIndex.save "
                    "replace it atomically) and load it again"
                )

    def _release_mapping(self) -> None:
        if self._mapped_file is not None:
            os.close(self._mapped_file[0])
            self._mapped_file = None

    def __del__(self):
        mapped = getattr(self, "_mapped_file", None)
        if mapped is not None:
            os.close(mapped[0])

    # -- mutation --------------------------------------------------------------------
    def add(self, codes, ids=None) -> np.ndarray:
        """Add packed uint8 codes (n, nbytes) (a 1-D array is one code).

        Args:
            ids: int64 ids >= 0, unique (within the batch and against the index). None:
                automatic ids, continuing a counter that is never reused (it also moves past
                every explicit id).

        Returns:
            The ids of the added codes.

        Raises:
            CodeFormatError: codes of another bit length or dtype.
            InvalidArgumentError: duplicate, negative or mis-sized ids (nothing is added then).
            IndexFullError: automatic ids would pass 2**63 - 1.
        """
        new = as_packed(codes, "HashIndex.add", "codes", bits=self._bits)
        m = new.shape[0]
        with self._lock:
            self._check_mapped_file()  # the first add copies the mapped arrays
            if ids is None:
                if self._next_id + m - 1 > _MAX_ID:
                    raise IndexFullError(
                        f"HashIndex.add: automatic ids have run out (the next would be {self._next_id}, the "
                        f"largest int64 is {_MAX_ID}); pass explicit ids"
                    )
                new_ids = np.arange(self._next_id, self._next_id + m, dtype=np.int64)
            else:
                new_ids = _as_ids(ids, m, "HashIndex.add")
                dup = _first_duplicate(new_ids)
                if dup is not None:
                    raise InvalidArgumentError(f"HashIndex.add: duplicate ids in the batch, e.g. {dup}")
            id_set = self._ensure_id_set()
            clash = new_ids[id_set.contains(new_ids)] if ids is not None else new_ids[:0]
            if clash.size:
                raise InvalidArgumentError(
                    f"HashIndex.add: {clash.size} id(s) already in the index, e.g. {clash[0]}; "
                    "ids must be unique (remove the old entries first)"
                )
            if m == 0:
                return new_ids
            need = self._count + m
            if self._mapped or need > self._codes.shape[0]:
                cap = max(need, 2 * self._codes.shape[0], 16)
                codes_buf = np.empty((cap, self.nbytes), dtype=np.uint8)
                ids_buf = np.empty(cap, dtype=np.int64)
                codes_buf[: self._count] = self._codes[: self._count]
                ids_buf[: self._count] = self._ids[: self._count]
                self._codes, self._ids, self._mapped = codes_buf, ids_buf, False
                self._release_mapping()
            # Only rows past the published count are written: snapshots never see them.
            self._codes[self._count : need] = new
            self._ids[self._count : need] = new_ids
            self._count = need
            id_set.add(new_ids)
            if new_ids.size:
                self._next_id = max(self._next_id, int(new_ids.max()) + 1)
            return new_ids

    def remove(self, ids) -> int:
        """Remove the codes with these ids; unknown ids are ignored. Returns how many were removed."""
        gone = _as_ids(ids, None, "HashIndex.remove", allow_negative=True) if np.size(ids) else np.empty(0, np.int64)
        with self._lock:
            self._check_mapped_file()
            cur = self._ids[: self._count]
            drop = np.isin(cur, gone)
            removed = int(drop.sum())
            if removed == 0:
                return 0
            keep = ~drop
            # New arrays: searches holding a snapshot of the old ones are unaffected.
            self._codes = np.ascontiguousarray(self._codes[: self._count][keep])
            self._ids = np.ascontiguousarray(cur[keep])
            self._count = self._ids.shape[0]
            self._mapped = False
            self._release_mapping()
            self._ensure_id_set().discard(cur[drop])
            return removed

    # -- search ----------------------------------------------------------------------
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
        q = self._queries(queries, "HashIndex.search")
        codes, ids = self._snapshot()
        dist, pos = knn_search(q, codes, k, threads)
        return dist, self._to_ids(pos, ids)

    def range_search(self, queries, radius: int, threads: int | None = None):
        """Every code within Hamming distance ``radius`` (inclusive) of each query.

        Returns:
            ``(lims, distances, ids)`` as :func:`cmhash.search.range_search`, with ids
            instead of positions.
        """
        q = self._queries(queries, "HashIndex.range_search")
        codes, ids = self._snapshot()
        lims, dist, pos = _range_search(q, codes, radius, threads)
        return lims, dist, ids[pos]

    @staticmethod
    def _to_ids(pos: np.ndarray, ids: np.ndarray) -> np.ndarray:
        out = np.full(pos.shape, -1, dtype=np.int64)
        found = pos >= 0
        out[found] = ids[pos[found]]
        return out

    # -- persistence -----------------------------------------------------------------
    def save(self, path) -> None:
        """Write the index to ``path`` atomically (see the module docstring for the format).

        On any error the temporary file is removed and an existing file at ``path`` is
        left as it was.
        """
        path = os.fspath(path)
        codes, ids = self._snapshot()
        count = codes.shape[0]
        with self._lock:
            next_id = self._next_id
        codes_bytes = count * self.nbytes
        payload_len = codes_bytes + _pad(codes_bytes) + count * 8
        parts = [memoryview(np.ascontiguousarray(codes).reshape(-1)), memoryview(bytes(_pad(codes_bytes))),
                 memoryview(np.ascontiguousarray(ids, dtype="<i8").view(np.uint8))]
        chunks = [part[off : off + _CHUNK] for part in parts for off in range(0, len(part), _CHUNK)]  # views
        crc = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
        head = _HEADER.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0, self._bits, HEADER_SIZE,
                            count, next_id, payload_len, crc, bytes(8))
        head += struct.pack("<I", zlib.crc32(head))
        atomic_write(path, [head, *chunks])

    @classmethod
    def load(cls, path, mmap: bool = False) -> "HashIndex":
        """Read an index written by :meth:`save`.

        Args:
            mmap: map the codes and ids read-only from the file instead of reading them
                into memory (the checksum is still verified, which reads the file once).

        Raises:
            IndexFileError: not a cmhash index, an unsupported format version, a truncated
                file, a checksum mismatch or impossible header values.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            raise IndexFileError(f"{path}: is a directory, not an index file; give the path of a file written by HashIndex.save")
        mapped_file = None
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            head = f.read(HEADER_SIZE)
            fields = cls._check_header(path, head, size)
            if mmap and size > 0 and fields["count"] > 0:
                buf = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
                data = memoryview(buf)
                # Kept open so every search can check that the file is still the one mapped.
                mapped_file = (os.dup(f.fileno()), (st.st_size, st.st_mtime_ns))
            else:
                data = memoryview(head + f.read())
        payload = data[HEADER_SIZE:]
        crc = 0
        for off in range(0, len(payload), _CHUNK):
            crc = zlib.crc32(payload[off : off + _CHUNK], crc)
        if crc != fields["payload_crc"]:
            raise IndexFileError(
                f"{path}: payload checksum mismatch (file says {fields['payload_crc']:#010x}, data gives "
                f"{crc:#010x}): the codes or ids are corrupted; restore the file from a backup or "
                "re-create it with HashIndex.save"
            )
        bits, count = fields["bits"], fields["count"]
        nbytes = bits // 8
        codes_len = count * nbytes
        codes = np.frombuffer(data, dtype=np.uint8, count=codes_len, offset=HEADER_SIZE).reshape(count, nbytes)
        ids = np.frombuffer(data, dtype="<i8", count=count, offset=HEADER_SIZE + codes_len + _pad(codes_len))
        if count and ids.min() < 0:
            raise IndexFileError(f"{path}: the file holds negative ids; re-create it with HashIndex.save")
        index = cls(bits)
        if mmap:
            index._codes, index._ids, index._mapped = codes, ids.astype(np.int64, copy=False), True
            index._mapped_file = mapped_file
        else:
            index._codes, index._ids = codes.copy(), ids.astype(np.int64)
        index._count = count
        index._next_id = max(fields["next_id"], int(ids.max()) + 1 if count else 0)
        if _first_duplicate(index._ids[:count]) is not None:
            raise IndexFileError(f"{path}: the file holds duplicate ids; re-create it with HashIndex.save")
        return index

    @classmethod
    def from_codes_file(cls, path) -> "HashIndex":
        """An in-memory index of the codes (and ids, when the file has them) of a codes file:
        ``.npy``, ``.npz`` as ``cmhash encode`` writes it, or Parquet codes (a file or a folder
        of parts; see :mod:`cmhash.parquet`). Read by :func:`cmhash.codefiles.load_codes`."""
        from .codefiles import load_codes

        columns = load_codes(path)
        index = cls(columns.bits)
        index.add(columns.codes, columns.ids)
        return index

    @staticmethod
    def _check_header(path: str, head: bytes, size: int) -> dict:
        redo = "re-create it with HashIndex.save"
        if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
            if MAGIC.startswith(head):
                raise IndexFileError(f"{path}: truncated file ({size} bytes, the header alone is {HEADER_SIZE}); {redo}")
            raise IndexFileError(
                f"{path}: not a cmhash index (it does not start with {MAGIC!r}); HashIndex.load reads "
                "files written by HashIndex.save"
            )
        if len(head) >= 12:
            major, minor = struct.unpack_from("<HH", head, 8)
            if major not in SUPPORTED_MAJORS:
                raise IndexFileError(
                    f"{path}: index format version {major}.{minor} is not supported; this cmhash reads "
                    f"versions {', '.join(f'{v}.x' for v in SUPPORTED_MAJORS)}; upgrade cmhash or {redo}"
                )
        if len(head) < HEADER_SIZE:
            raise IndexFileError(f"{path}: truncated file ({size} bytes, the header alone is {HEADER_SIZE}); {redo}")
        (_, major, minor, flags, bits, offset, count, next_id, payload_len, payload_crc, _) = _HEADER.unpack_from(head)
        (head_crc,) = struct.unpack_from("<I", head, _HEADER.size)
        if zlib.crc32(head[: _HEADER.size]) != head_crc:
            raise IndexFileError(f"{path}: header checksum mismatch: the header is corrupted; {redo}")
        problems = []
        try:
            check_bits(bits, f"bits={bits}")
        except CodeFormatError as exc:
            problems.append(str(exc))
        if bits > _MAX_BITS:
            problems.append(f"bits={bits} is more than {_MAX_BITS}")
        if offset != HEADER_SIZE:
            problems.append(f"payload offset {offset} (expected {HEADER_SIZE})")
        if flags != 0:
            problems.append(f"unknown flags {flags:#x}")
        if not problems:
            codes_len = count * (bits // 8)
            expected = codes_len + _pad(codes_len) + count * 8
            if payload_len != expected:
                problems.append(f"payload length {payload_len} does not match {count} codes of {bits} bits ({expected})")
        if problems:
            raise IndexFileError(f"{path}: bad header values: {'; '.join(problems)}; {redo}")
        if size < HEADER_SIZE + payload_len:
            raise IndexFileError(
                f"{path}: truncated file: {size} bytes, the header announces {HEADER_SIZE + payload_len} "
                f"({count} codes of {bits} bits); {redo}"
            )
        if size > HEADER_SIZE + payload_len:
            raise IndexFileError(
                f"{path}: {size - HEADER_SIZE - payload_len} unexpected bytes after the payload; {redo}"
            )
        return {"bits": bits, "count": count, "next_id": next_id, "payload_crc": payload_crc}
