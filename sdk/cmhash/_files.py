"""Deprecated name of :mod:`cmhash.files`, kept for one release."""

from .files import atomic_path, atomic_write, fsync  # noqa: F401
