"""Index files: the fixed header, the codes and ids, and the section table after them.
The format is described in the docstring of :mod:`cmhash.index`.
"""

from __future__ import annotations

import mmap as _mmap
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from .. import _hamming
from ..codes import check_bits
from ..errors import CodeFormatError, IndexFileError
from ..files import atomic_write

MAGIC = b"CMHIDX\x00\x01"
FORMAT_MAJOR = 1
FORMAT_MINOR = 1
SUPPORTED_MAJORS = (1,)
KIND_FLAT, KIND_MIH = 0, 1
KIND_NAMES = {KIND_FLAT: "flat", KIND_MIH: "mih"}
HEADER = struct.Struct("<8sHHIIIQQQIII")  # everything up to the header CRC: 60 bytes
HEADER_SIZE = 64
ALIGN = 64
SECTION_MAGIC = b"CMHSECT\x00"
TABLE_HEAD = struct.Struct("<8sII")
ENTRY = struct.Struct("<4sIQQ")
MAX_SECTIONS = 64
MAX_BITS = _hamming.sysinfo()["max_bits"]
CHUNK = 1 << 24  # bytes per write/CRC step, so saving never copies the whole index


def pad(n: int) -> int:
    return -n % ALIGN


def crc32(buffers) -> int:
    crc = 0
    for buf in buffers:
        view = memoryview(buf).cast("B")
        for off in range(0, len(view), CHUNK):
            crc = zlib.crc32(view[off : off + CHUNK], crc)
    return crc


def _chunks(buffers) -> list[memoryview]:
    views = [memoryview(b).cast("B") for b in buffers]
    return [v[off : off + CHUNK] for v in views for off in range(0, len(v), CHUNK)]


def as_bytes(array: np.ndarray) -> memoryview:
    """The bytes of a little-endian array, without copying when it already is one."""
    arr = np.ascontiguousarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return memoryview(arr.reshape(-1).view(np.uint8))


def write(path: str, *, kind: int, bits: int, next_id: int, codes: np.ndarray, ids: np.ndarray,
          sections: dict[bytes, list]) -> None:
    """Write an index file atomically. ``sections`` maps tags to lists of byte buffers;
    empty ones are left out."""
    count = codes.shape[0]
    codes_len = codes.size
    payload = [as_bytes(codes), bytes(pad(codes_len)), as_bytes(ids.astype("<i8", copy=False))]
    payload_len = codes_len + pad(codes_len) + count * 8
    head = HEADER.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0, bits, HEADER_SIZE, count, next_id, payload_len,
                       crc32(payload), kind, 0)
    parts = [head + struct.pack("<I", zlib.crc32(head)), *payload]
    items = [(tag, bufs, sum(memoryview(b).nbytes for b in bufs)) for tag, bufs in sections.items()]
    items = [item for item in items if item[2] > 0]
    if items:
        end = HEADER_SIZE + payload_len
        table_at = end + pad(end)
        at = table_at + TABLE_HEAD.size + ENTRY.size * len(items)
        entries = b""
        for tag, bufs, length in items:
            at += pad(at)
            entries += ENTRY.pack(tag, crc32(bufs), at, length)
            at += length
        parts += [bytes(table_at - end), TABLE_HEAD.pack(SECTION_MAGIC, len(items), zlib.crc32(entries)), entries]
        at = table_at + TABLE_HEAD.size + len(entries)
        for _, bufs, length in items:
            parts.append(bytes(pad(at)))
            parts += bufs
            at += pad(at) + length
    atomic_write(path, _chunks(parts))


@dataclass
class Contents:
    """What :func:`read` found: header fields, the codes and ids, and the sections by tag
    (read-only views into the file's bytes or its mapping)."""

    kind: int
    minor: int
    bits: int
    count: int
    next_id: int
    codes: np.ndarray
    ids: np.ndarray
    sections: dict[bytes, memoryview] = field(default_factory=dict)
    mapped_file: tuple | None = None  # (fd, (size, mtime_ns)) when mapped


def read(path, mmap: bool, redo: str) -> Contents:
    """Read and verify an index file. ``redo`` ends every error message (what to do)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IndexFileError(f"{path}: is a directory, not an index file; give the path of a file written by HashIndex.save")
    mapped_file = None
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        head = f.read(HEADER_SIZE)
        h = _check_header(path, head, size, redo)
        if mmap and size > HEADER_SIZE and h["count"] > 0:
            buf = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
            data = memoryview(buf)
            # Kept open so every search can check that the file is still the one mapped.
            mapped_file = (os.dup(f.fileno()), (st.st_size, st.st_mtime_ns))
        else:
            data = memoryview(head + f.read())
    try:
        payload_end = HEADER_SIZE + h["payload_len"]
        if len(data) != size:
            raise IndexFileError(f"{path}: the file changed while it was being read; {redo}")
        if crc32([data[HEADER_SIZE:payload_end]]) != h["payload_crc"]:
            raise IndexFileError(
                f"{path}: payload checksum mismatch: the codes or ids are corrupted; restore the file from a "
                f"backup or {redo}"
            )
        sections = _read_sections(path, data, payload_end, redo) if size > payload_end else {}
        bits, count = h["bits"], h["count"]
        codes_len = count * (bits // 8)
        codes = np.frombuffer(data, dtype=np.uint8, count=codes_len, offset=HEADER_SIZE).reshape(count, bits // 8)
        ids = np.frombuffer(data, dtype="<i8", count=count, offset=HEADER_SIZE + codes_len + pad(codes_len))
        if count and ids.min() < 0:
            raise IndexFileError(f"{path}: the file holds negative ids; {redo}")
    except BaseException:
        if mapped_file is not None:
            os.close(mapped_file[0])
        raise
    return Contents(h["kind"], h["minor"], bits, count, h["next_id"], codes, ids, sections, mapped_file)


def _read_sections(path: str, data: memoryview, payload_end: int, redo: str) -> dict[bytes, memoryview]:
    size = len(data)
    at = payload_end + pad(payload_end)
    if size < at + TABLE_HEAD.size or bytes(data[at : at + 8]) != SECTION_MAGIC or any(data[payload_end:at]):
        raise IndexFileError(
            f"{path}: {size - payload_end} unexpected bytes after the payload, and no section table there; {redo}"
        )
    _, n, entries_crc = TABLE_HEAD.unpack_from(data, at)
    at += TABLE_HEAD.size
    if n == 0 or n > MAX_SECTIONS or size < at + n * ENTRY.size:
        raise IndexFileError(f"{path}: damaged section table ({n} sections announced); {redo}")
    entries = bytes(data[at : at + n * ENTRY.size])
    if zlib.crc32(entries) != entries_crc:
        raise IndexFileError(f"{path}: section table checksum mismatch: the table is corrupted; {redo}")
    end = at + n * ENTRY.size
    sections = {}
    for i in range(n):
        tag, crc, offset, length = ENTRY.unpack_from(entries, i * ENTRY.size)
        name = tag.decode("ascii", "replace")
        if offset == end + pad(end) and offset + length > size:
            raise IndexFileError(f"{path}: truncated file: section {name!r} ends at byte {offset + length}, "
                                 f"the file has {size}; {redo}")
        if offset != end + pad(end) or tag in sections:
            raise IndexFileError(f"{path}: section {name!r} is misplaced or repeated in the section table; {redo}")
        view = data[offset : offset + length]
        if crc32([view]) != crc:
            raise IndexFileError(f"{path}: section {name!r} checksum mismatch: it is corrupted; {redo}")
        sections[tag] = view
        end = offset + length
    if end != size:
        raise IndexFileError(f"{path}: {size - end} unexpected bytes after the last section; {redo}")
    return sections


def peek_kind(path) -> int:
    """The index kind of a file (its header is checked; the rest is read by ``load``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IndexFileError(f"{path}: is a directory, not an index file; give the path of a file written by save()")
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
        size = os.fstat(f.fileno()).st_size
    return _check_header(path, head, size, "re-create it with save()")["kind"]


def _check_header(path: str, head: bytes, size: int, redo: str) -> dict:
    if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
        if MAGIC.startswith(head):
            raise IndexFileError(f"{path}: truncated file ({size} bytes, the header alone is {HEADER_SIZE}); {redo}")
        raise IndexFileError(
            f"{path}: not a cmhash index (it does not start with {MAGIC!r}); HashIndex.load and "
            "cmhash.index.load_index read files written by HashIndex.save"
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
    (_, major, minor, flags, bits, offset, count, next_id, payload_len, payload_crc, kind, reserved) = HEADER.unpack_from(head)
    (head_crc,) = struct.unpack_from("<I", head, HEADER.size)
    if zlib.crc32(head[: HEADER.size]) != head_crc:
        raise IndexFileError(f"{path}: header checksum mismatch: the header is corrupted; {redo}")
    problems = []
    try:
        check_bits(bits, f"bits={bits}")
    except CodeFormatError as exc:
        problems.append(str(exc))
    if bits > MAX_BITS:
        problems.append(f"bits={bits} is more than {MAX_BITS}")
    if offset != HEADER_SIZE:
        problems.append(f"payload offset {offset} (expected {HEADER_SIZE})")
    if flags != 0:
        problems.append(f"unknown flags {flags:#x}")
    if kind not in KIND_NAMES:
        problems.append(f"unknown index kind {kind} (this cmhash knows {sorted(KIND_NAMES)}; upgrade cmhash)")
    if reserved != 0:
        problems.append(f"reserved field {reserved:#x} is not zero")
    if not problems:
        codes_len = count * (bits // 8)
        expected = codes_len + pad(codes_len) + count * 8
        if payload_len != expected:
            problems.append(f"payload length {payload_len} does not match {count} codes of {bits} bits ({expected})")
    if problems:
        raise IndexFileError(f"{path}: bad header values: {'; '.join(problems)}; {redo}")
    if size < HEADER_SIZE + payload_len:
        raise IndexFileError(
            f"{path}: truncated file: {size} bytes, the header announces {HEADER_SIZE + payload_len} "
            f"({count} codes of {bits} bits); {redo}"
        )
    if minor == 0 and size > HEADER_SIZE + payload_len:
        raise IndexFileError(f"{path}: {size - HEADER_SIZE - payload_len} unexpected bytes after the payload; {redo}")
    return {"kind": kind, "minor": minor, "bits": bits, "count": count, "next_id": next_id,
            "payload_len": payload_len, "payload_crc": payload_crc}
