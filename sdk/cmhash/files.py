"""Atomic file writes: the one way cmhash (and its training and export) writes a file that
something else will read.

The data goes to a temporary file beside the target (``.<name>.<random>.tmp``), is fsynced,
and replaces the target with ``os.replace``; the directory is then fsynced so the rename
survives a power cut. A crash, a kill or an exception at any point leaves the previous
file whole (and at worst a stray temporary, never a half-written target).

Temporary files and folders are created private (``mkstemp``/``mkdtemp`` give 0600/0700)
and opened up to what the process's umask allows before they take the target's place, so
a bundle or an index written by one user can be read by another, as with any other writer.
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


def _umask() -> int:
    try:  # Linux reports it without changing it; os.umask() would, for a moment, for every thread
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_up(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a private temporary file or folder the mode a plain create would have had."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def temp_dir_beside(target: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A new folder next to ``target`` (same file system, so it can be renamed into place)."""
    target = Path(target)
    path = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix))
    open_up(path, directory=True)
    return path


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
        open_up(tmp)
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
