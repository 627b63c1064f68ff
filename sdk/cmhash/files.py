"""Atomic file writes: the one way cmhash (and its training and export) writes a file that
something else will read.

The data goes to a temporary file beside the target (``.<name>.<random>.tmp``), is fsynced,
and replaces the target with ``os.replace``; the directory is then fsynced so the rename
survives a power cut. A crash, a kill or an exception at any point leaves the previous
file whole (and at worst a stray temporary, never a half-written target).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write (and close) the new file at; on a normal exit it
    replaces ``path``, on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | Iterable[bytes]) -> Path:
    """Write ``data`` (bytes, or an iterable of byte chunks) to ``path`` atomically."""
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
    return Path(path)
