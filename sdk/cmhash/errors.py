"""The exceptions cmhash raises. Each subclasses the built-in a caller would expect,
so ``except ValueError`` still works, while ``except cmhash.CmhashError`` catches all."""

from __future__ import annotations


class CmhashError(Exception):
    """Base class of every error cmhash raises on purpose."""


class CodeFormatError(CmhashError, ValueError):
    """Codes of the wrong dtype, shape or bit length (e.g. 64-bit queries on a 32-bit index)."""


class IndexFileError(CmhashError, ValueError):
    """An index file that is truncated, corrupted, of another format or of an unknown version."""
