"""Indexes of packed binary codes with ids: exact Hamming search, names, metadata and a
checksummed file format.

Index kinds:

- :class:`HashIndex` (kind 0, "flat"): an exact linear scan over every code.
- :class:`MultiIndex` (kind 1, "mih"): multi-index hashing, exact search in sublinear time
  on structured codes, falling back to the scan where that is faster (:mod:`cmhash.index.mih`).

``load_index(path, mmap=...)`` reads a file of any kind and returns the matching class;
``HashIndex.load`` reads flat files. Saves are atomic (temporary file in the same
directory, fsync, ``os.replace``, fsync of the directory): a crash or a kill during a save
leaves the previous file intact. No pickle is involved anywhere.

File format (version 1.1), all integers little-endian::

    offset size  field
    0      8     magic b"CMHIDX\\x00\\x01"
    8      2     format major version (1); readers refuse majors they do not know
    10     2     format minor version (1); additions a 1.x reader may ignore
    12     4     flags (0; no flags are defined yet, readers refuse unknown ones)
    16     4     bits per code (a positive multiple of 8)
    20     4     payload offset (64)
    24     8     count: number of codes
    32     8     next automatic id
    40     8     payload length in bytes
    48     4     CRC-32 (zlib) of the payload
    52     4     index kind: 0 flat (HashIndex), 1 multi-index hashing (MultiIndex)
    56     4     reserved, zero
    60     4     CRC-32 (zlib) of header bytes 0..59
    64     ...   payload: codes (count x bits/8 bytes, row-major), zero padding up to a
                 multiple of 64 bytes, then ids (count x int64)

Version 1.0 is the same file with minor version 0, bytes 52..59 zero (so kind 0, flat) and
nothing after the payload. A 1.1 file with nothing to add beyond codes and ids also ends
with the payload.

Everything else (metadata, item names, the tables of a multi-index) lives in *sections*
after the payload. When the file is longer than ``64 + payload length``, a section table
starts at the first multiple of 64 at or after the end of the payload::

    0      8     magic b"CMHSECT\\x00"
    8      4     number of sections N (at most 64)
    12     4     CRC-32 of the N entries that follow
    16     24*N  entries: tag (4 ASCII bytes), CRC-32 of the section's bytes (u32),
                 absolute offset (u64, a multiple of 64), length in bytes (u64)

Sections follow the table in the order of the entries, each at the first multiple of 64
after the end of the previous one (the table, for the first), with zero padding between;
the file ends exactly where the last section ends. Tags are unique. Readers verify the
table and every section against their CRCs, and ignore sections with tags they do not
know. Tags defined so far:

    META   metadata: one JSON object, UTF-8 (at most ``cmhash.limits.MAX_METADATA_BYTES``)
    NOFF   item names, offsets: count + 1 int64, non-decreasing, from 0 to the length of
           NAME; the name of the code at position i is NAME[NOFF[i]:NOFF[i+1]], and an
           empty name means "no name"
    NAME   item names, bytes: the names in position order, UTF-8, back to back
    MIHP   multi-index parameters: JSON {"substrings": m or null, "start": [...], "width": [...]}
    MIHO   multi-index bucket offsets: for each table j, 2**width[j] + 1 int32, from 0 to count
    MIHR   multi-index tables in rank order (ranks number the codes in table 0's bucket
           order): perm, count int32 (the position of each rank), then ranks, (m - 1) x
           count int32. Table 0's bucket `key` is ranks MIHO[key] .. MIHO[key + 1] - 1; table
           j >= 1's is ranks[(j-1)*count + MIHO[b_j + key] : (j-1)*count + MIHO[b_j + key + 1]],
           b_j the start of table j's offsets (see :mod:`cmhash.index.mih`)
    MIHI   the tables as positions (read, converted to MIHR's layout at load; not written):
           m x count int32, table j's bucket `key` being
           MIHI[j*count + MIHO[b_j + key] : j*count + MIHO[b_j + key + 1]]

A multi-index file holds MIHP and MIHO with one of MIHR and MIHI, or none of them. Every
section starts at a multiple of 64, so ``mmap=True`` maps the names and tables without
copying, as it does the codes and ids (a multi-index also gathers its copy of the codes in
rank order into memory).
"""

from __future__ import annotations

from . import _file
from ._store import CodeStore, _IdSet
from .flat import HashIndex
from .mih import MultiIndex

__all__ = ["CodeStore", "HashIndex", "MultiIndex", "load_index"]

_KINDS = {cls.KIND: cls for cls in (HashIndex, MultiIndex)}


def load_index(path, mmap: bool = False) -> CodeStore:
    """Read an index file of any kind; returns a :class:`HashIndex` or a
    :class:`MultiIndex` as the file's header says (see :meth:`CodeStore.load` for ``mmap``
    and the errors)."""
    return _KINDS[_file.peek_kind(path)].load(path, mmap=mmap)
