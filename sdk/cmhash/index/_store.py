"""Storage shared by every index kind: codes, ids, optional item names and metadata, the
lock that makes searches safe beside writers, and memory-mapped copy-on-write.

An index kind subclasses :class:`CodeStore` and adds its search; it may keep derived
structures (tables) in step by overriding :meth:`CodeStore._changed`, which runs under the
lock after every add and remove, and save and load more sections through
:meth:`CodeStore._extra_sections` and :meth:`CodeStore._load_extra`.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np

from .. import limits
from ..codes import as_packed, check_bits
from ..errors import (ArgumentTypeError, IndexChangedError, IndexFileError, IndexFullError, InvalidArgumentError,
                      ResourceLimitError, UnknownIdError)
from . import _file

_MAX_ID = np.iinfo(np.int64).max


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


def check_metadata(metadata, func: str) -> dict:
    """A copy of ``metadata`` (a JSON-able dict within MAX_METADATA_BYTES); {} for None."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ArgumentTypeError(f"{func}: metadata must be a dict (a JSON object), got {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ArgumentTypeError(f"{func}: metadata must be JSON-able (str keys; str, numbers, bools, None, "
                                f"lists and dicts as values): {exc}") from None
    size = len(text.encode())
    if size > limits.MAX_METADATA_BYTES:
        raise ResourceLimitError(
            f"{func}: metadata takes {size:,} bytes as JSON, over the limit of {limits.MAX_METADATA_BYTES:,}; "
            "keep per-item data out of it (item names go in add(names=...)) or raise "
            "cmhash.limits.MAX_METADATA_BYTES (env CMHASH_MAX_METADATA_BYTES)"
        )
    return json.loads(text)


def _encode_names(names, m: int, func: str) -> tuple[np.ndarray, bytes] | None:
    """(lengths int64 (m,), UTF-8 bytes) of a batch of names; None and "" mean no name."""
    if names is None:
        return None
    if isinstance(names, (str, bytes)):
        raise ArgumentTypeError(f"{func}: names must be a sequence of str (one per code), not one {type(names).__name__}")
    names = list(names.tolist() if isinstance(names, np.ndarray) else names)
    if len(names) != m:
        raise InvalidArgumentError(f"{func}: got {len(names)} names for {m} codes")
    encoded = []
    for name in names:
        if name is None:
            encoded.append(b"")
        elif isinstance(name, str):
            encoded.append(name.encode("utf-8", "surrogatepass"))
        else:
            raise ArgumentTypeError(f"{func}: names must be str or None, got {type(name).__name__}")
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=m)
    return lengths, b"".join(encoded)


class CodeStore:
    """Codes with unique int64 ids (>= 0), optional names and metadata; no search.

    Storage grows by doubling, so ``add`` is amortised O(batch). Readers take a consistent
    snapshot under the lock: appends write only past the published count, and removal
    builds new arrays, so a snapshot never changes under its holder.
    """

    KIND = _file.KIND_FLAT

    def __init__(self, bits: int, metadata: dict | None = None):
        name = type(self).__name__
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
            raise ArgumentTypeError(f"{name}: bits must be an int, got {type(bits).__name__}")
        check_bits(bits, f"{name}: bits", InvalidArgumentError)
        if bits > _file.MAX_BITS:
            raise InvalidArgumentError(f"{name}: bits must be at most {_file.MAX_BITS}, got {bits}")
        self._bits = int(bits)
        self._metadata = check_metadata(metadata, name)
        self._lock = threading.Lock()
        self._codes = np.empty((0, self._bits // 8), dtype=np.uint8)  # capacity rows
        self._ids = np.empty(0, dtype=np.int64)
        self._count = 0
        self._next_id = 0
        # Names, when any were given: name i is _name_bytes[_name_ends[i]:_name_ends[i + 1]]
        # (capacity + 1 offsets, published up to count + 1); an empty name is no name.
        self._name_ends: np.ndarray | None = None
        self._name_bytes = np.empty(0, dtype=np.uint8)
        self._id_set: _IdSet | None = None  # built on the first add or remove
        self._id_order: np.ndarray | None = None  # argsort of the ids, for names(); reset on change
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
        return self._snapshot()[0]

    @property
    def ids(self) -> np.ndarray:
        """Read-only view of the ids (len,), aligned with :attr:`codes`."""
        return self._snapshot()[1]

    @property
    def metadata(self) -> dict:
        """A copy of the index's metadata (a JSON object, saved with the index)."""
        return json.loads(json.dumps(self._metadata))

    @metadata.setter
    def metadata(self, value: dict) -> None:
        self._metadata = check_metadata(value, f"{type(self).__name__}.metadata")

    @property
    def bundle_fingerprint(self) -> str | None:
        """The fingerprint of the bundle that made the codes (``metadata["bundle_fingerprint"]``),
        None when unknown. Codes are comparable only with codes of the same fingerprint."""
        value = self._metadata.get("bundle_fingerprint")
        return value if isinstance(value, str) else None

    @property
    def has_names(self) -> bool:
        """Whether any code was added with a name (see :meth:`names`)."""
        return self._name_ends is not None

    @property
    def kind(self) -> str:
        """The index kind as the file header names it: "flat" or "mih"."""
        return _file.KIND_NAMES[self.KIND]

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self._bits}, len={self._count}{', mmap' if self._mapped else ''})"

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
                    f"{type(self).__name__}: the file under this memory-mapped index was modified or truncated "
                    "after loading; never write an index file in place (save to a new file, or let save() "
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

    def _changed(self, removed: bool) -> None:
        """Hook for index kinds: codes were appended, or some ``removed`` (positions then
        shift). Called under the lock."""

    # -- mutation --------------------------------------------------------------------
    def add(self, codes, ids=None, names=None) -> np.ndarray:
        """Add packed uint8 codes (n, nbytes) (a 1-D array is one code).

        Args:
            ids: int64 ids >= 0, unique (within the batch and against the index). None:
                automatic ids, continuing a counter that is never reused (it also moves past
                every explicit id).
            names: optional item names, one str (or None: no name) per code, saved with
                the index and returned by :meth:`names`. An empty string is no name.

        Returns:
            The ids of the added codes.

        Raises:
            CodeFormatError: codes of another bit length or dtype.
            InvalidArgumentError: duplicate, negative or mis-sized ids or names (nothing is
                added then).
            IndexFullError: automatic ids would pass 2**63 - 1.
        """
        func = f"{type(self).__name__}.add"
        new = as_packed(codes, func, "codes", bits=self._bits)
        m = new.shape[0]
        batch_names = _encode_names(names, m, func)
        with self._lock:
            self._check_mapped_file()  # the first add copies the mapped arrays
            if ids is None:
                if self._next_id + m - 1 > _MAX_ID:
                    raise IndexFullError(
                        f"{func}: automatic ids have run out (the next would be {self._next_id}, the "
                        f"largest int64 is {_MAX_ID}); pass explicit ids"
                    )
                new_ids = np.arange(self._next_id, self._next_id + m, dtype=np.int64)
            else:
                new_ids = _as_ids(ids, m, func)
                dup = _first_duplicate(new_ids)
                if dup is not None:
                    raise InvalidArgumentError(f"{func}: duplicate ids in the batch, e.g. {dup}")
            id_set = self._ensure_id_set()
            clash = new_ids[id_set.contains(new_ids)] if ids is not None else new_ids[:0]
            if clash.size:
                raise InvalidArgumentError(
                    f"{func}: {clash.size} id(s) already in the index, e.g. {clash[0]}; "
                    "ids must be unique (remove the old entries first)"
                )
            if m == 0:
                return new_ids
            need = self._count + m
            if self._mapped or need > self._codes.shape[0]:
                self._grow(need)
            self._append_names(batch_names, need)
            # Only rows past the published count are written: snapshots never see them.
            self._codes[self._count : need] = new
            self._ids[self._count : need] = new_ids
            self._count = need
            id_set.add(new_ids)
            self._id_order = None
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
            self._changed(removed=False)
            return new_ids

    def _grow(self, need: int) -> None:
        """New arrays with room for ``need`` codes (copying a mapped index into memory)."""
        cap = max(need, 2 * self._codes.shape[0], 16)
        codes_buf = np.empty((cap, self.nbytes), dtype=np.uint8)
        ids_buf = np.empty(cap, dtype=np.int64)
        codes_buf[: self._count] = self._codes[: self._count]
        ids_buf[: self._count] = self._ids[: self._count]
        if self._name_ends is not None:
            ends = np.empty(cap + 1, dtype=np.int64)
            ends[: self._count + 1] = self._name_ends[: self._count + 1]
            used = int(ends[self._count])
            self._name_ends, self._name_bytes = ends, np.array(self._name_bytes[:used], dtype=np.uint8)
        self._codes, self._ids, self._mapped = codes_buf, ids_buf, False
        self._release_mapping()

    def _append_names(self, batch: tuple[np.ndarray, bytes] | None, need: int) -> None:
        """Write the names of the codes at positions count..need (called after _grow)."""
        if batch is None and self._name_ends is None:
            return
        if self._name_ends is None:  # the first names: every earlier code has none
            self._name_ends = np.zeros(self._codes.shape[0] + 1, dtype=np.int64)
        lengths, blob = batch if batch is not None else (np.zeros(need - self._count, np.int64), b"")
        used = int(self._name_ends[self._count])
        if used + len(blob) > self._name_bytes.size:
            grown = np.empty(max(used + len(blob), 2 * self._name_bytes.size, 1024), dtype=np.uint8)
            grown[:used] = self._name_bytes[:used]
            self._name_bytes = grown
        self._name_bytes[used : used + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
        self._name_ends[self._count + 1 : need + 1] = used + np.cumsum(lengths)

    def remove(self, ids) -> int:
        """Remove the codes with these ids (and their names); unknown ids are ignored.
        Returns how many were removed."""
        func = f"{type(self).__name__}.remove"
        gone = _as_ids(ids, None, func, allow_negative=True) if np.size(ids) else np.empty(0, np.int64)
        with self._lock:
            self._check_mapped_file()
            cur = self._ids[: self._count]
            drop = np.isin(cur, gone)
            removed = int(drop.sum())
            if removed == 0:
                return 0
            keep = ~drop
            # New arrays: searches holding a snapshot of the old ones are unaffected.
            if self._name_ends is not None:
                ends = self._name_ends[: self._count + 1]
                lengths = np.diff(ends)
                blob = self._name_bytes[: int(ends[-1])]
                self._name_bytes = np.ascontiguousarray(blob[np.repeat(keep, lengths)])
                self._name_ends = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)
            self._codes = np.ascontiguousarray(self._codes[: self._count][keep])
            self._ids = np.ascontiguousarray(cur[keep])
            self._count = self._ids.shape[0]
            self._mapped = False
            self._release_mapping()
            self._ensure_id_set().discard(cur[drop])
            self._id_order = None
            self._changed(removed=True)
            return removed

    # -- names -----------------------------------------------------------------------
    def names(self, ids) -> list[str | None]:
        """The names of the codes with these ids, None for a code added without a name.

        Raises:
            UnknownIdError: an id that is not in the index (a KeyError); the message names it.
        """
        func = f"{type(self).__name__}.names"
        want = _as_ids(ids, None, func, allow_negative=True) if np.size(ids) else np.empty(0, np.int64)
        with self._lock:
            self._check_mapped_file()
            count = self._count
            cur = self._ids[:count]
            if self._id_order is None:
                self._id_order = np.argsort(cur, kind="stable")
            order = self._id_order
            ends = self._name_ends[: count + 1] if self._name_ends is not None else None
            blob = self._name_bytes
        sorted_ids = cur[order]
        at = np.searchsorted(sorted_ids, want).clip(max=max(count - 1, 0))
        found = (sorted_ids[at] == want) if count else np.zeros(want.shape, bool)
        if not found.all():
            missing = want[~found]
            raise UnknownIdError(f"{func}: {missing.size} id(s) not in the index, e.g. {missing[0]}")
        if ends is None:
            return [None] * want.size
        pos = order[at]
        out = []
        for start, end in zip(ends[pos].tolist(), ends[pos + 1].tolist()):
            if start == end:
                out.append(None)
                continue
            try:
                out.append(bytes(blob[start:end]).decode("utf-8", "surrogatepass"))
            except UnicodeDecodeError:
                raise IndexFileError(f"{func}: a stored name is not valid UTF-8; the index file was "
                                     "damaged, re-create it with save()") from None
        return out

    # -- persistence -----------------------------------------------------------------
    def _state(self) -> dict:
        """A consistent copy of what save() writes: codes, ids, next id, names, metadata."""
        with self._lock:
            self._check_mapped_file()
            count = self._count
            state = {"codes": self._codes[:count], "ids": self._ids[:count], "next_id": self._next_id,
                     "metadata": self._metadata, "sections": {}}
            if self._name_ends is not None:
                ends = self._name_ends[: count + 1]
                state["sections"][b"NOFF"] = [_file.as_bytes(ends)]
                state["sections"][b"NAME"] = [memoryview(self._name_bytes[: int(ends[-1])])]
            state["sections"].update(self._extra_sections())
        if state["metadata"]:
            state["sections"][b"META"] = [json.dumps(state["metadata"], ensure_ascii=False).encode()]
        return state

    def _extra_sections(self) -> dict:
        """Hook for index kinds: more sections to save, by tag (called under the lock)."""
        return {}

    def save(self, path) -> None:
        """Write the index to ``path`` atomically (format: :mod:`cmhash.index`).

        On any error the temporary file is removed and an existing file at ``path`` is
        left as it was.
        """
        state = self._state()
        _file.write(os.fspath(path), kind=self.KIND, bits=self._bits, next_id=state["next_id"],
                    codes=state["codes"], ids=state["ids"], sections=state["sections"])

    @classmethod
    def load(cls, path, mmap: bool = False):
        """Read an index of this kind written by :meth:`save` (``cmhash.index.load_index``
        reads any kind).

        Args:
            mmap: map the codes, ids, names and tables read-only from the file instead of
                reading them into memory (the checksums are still verified, which reads
                the file once). The first ``add`` or ``remove`` copies them into memory.

        Raises:
            IndexFileError: not a cmhash index, an index of another kind, an unsupported
                format version, a truncated file, a checksum mismatch or impossible values.
        """
        redo = f"re-create it with {cls.__name__}.save"
        contents = _file.read(path, mmap, redo)
        try:
            if contents.kind != cls.KIND:
                raise IndexFileError(
                    f"{os.fspath(path)}: this is a {_file.KIND_NAMES[contents.kind]} index, not a "
                    f"{_file.KIND_NAMES[cls.KIND]} one; load it with cmhash.index.load_index"
                )
            index = cls._from_contents(os.fspath(path), contents, mmap, redo)
        except BaseException:
            if contents.mapped_file is not None:
                os.close(contents.mapped_file[0])
            raise
        return index

    @classmethod
    def _from_contents(cls, path: str, c: _file.Contents, mmap: bool, redo: str):
        metadata = _read_metadata(path, c.sections.get(b"META"), redo)
        index = cls(c.bits, metadata=None)
        index._metadata = metadata
        count = c.count
        ids = c.ids.astype(np.int64, copy=False)
        if mmap:
            index._codes, index._ids, index._mapped = c.codes, ids, True
        else:
            index._codes, index._ids = c.codes.copy(), ids.copy()
        index._count = count
        index._next_id = max(c.next_id, int(ids.max()) + 1 if count else 0)
        if _first_duplicate(index._ids[:count]) is not None:
            raise IndexFileError(f"{path}: the file holds duplicate ids; {redo}")
        if (b"NOFF" in c.sections) != (b"NAME" in c.sections):
            raise IndexFileError(f"{path}: the file holds half of the item names (NOFF or NAME alone); {redo}")
        if b"NOFF" in c.sections:
            noff, blob = c.sections[b"NOFF"], c.sections[b"NAME"]
            if len(noff) != 8 * (count + 1):
                raise IndexFileError(f"{path}: the names section has {len(noff)} bytes of offsets for {count} codes; {redo}")
            ends = np.frombuffer(noff, dtype="<i8").astype(np.int64, copy=False)
            if ends[0] != 0 or ends[-1] != len(blob) or (count and np.any(np.diff(ends) < 0)):
                raise IndexFileError(f"{path}: the item name offsets are out of order or out of range; {redo}")
            blob = np.frombuffer(blob, dtype=np.uint8)
            index._name_ends, index._name_bytes = (ends, blob) if mmap else (ends.copy(), blob.copy())
        index._load_extra(path, c, mmap, redo)
        if mmap:
            index._mapped_file = c.mapped_file
        elif c.mapped_file is not None:
            os.close(c.mapped_file[0])
        return index

    def _load_extra(self, path: str, c: _file.Contents, mmap: bool, redo: str) -> None:
        """Hook for index kinds: read their sections (or rebuild their tables)."""


def _read_metadata(path: str, raw: memoryview | None, redo: str) -> dict:
    if raw is None:
        return {}
    if len(raw) > limits.MAX_METADATA_BYTES:
        raise ResourceLimitError(
            f"{path}: the index metadata takes {len(raw):,} bytes, over the limit of "
            f"{limits.MAX_METADATA_BYTES:,}; raise cmhash.limits.MAX_METADATA_BYTES (env CMHASH_MAX_METADATA_BYTES) "
            "if you trust the file"
        )
    try:
        value = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise IndexFileError(f"{path}: the metadata section is not a JSON object; {redo}")
    return value
