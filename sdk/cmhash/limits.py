"""Size limits checked before cmhash allocates a result, so that a typo (``k=10**12``) or a
hostile input ends in a :class:`~cmhash.errors.ResourceLimitError` that says what to change,
not in a ``MemoryError`` or the kernel's out-of-memory killer.

Each limit is a module attribute, read at call time; raise it in code
(``cmhash.limits.MAX_RESULT_BYTES = 64 << 30``) or, before the first import, with the
environment variable of the same name prefixed by ``CMHASH_``.
"""

from __future__ import annotations

import os

from .errors import ResourceLimitError

__all__ = ["MAX_BUNDLE_BYTES", "MAX_IMAGE_BYTES", "MAX_IMAGE_SIDE", "MAX_INPUT_BYTES", "MAX_METADATA_BYTES", "MAX_QUERY_K",
           "MAX_QUERY_TEXT_CHARS", "MAX_RESULT_BYTES", "MAX_UPLOAD_BYTES", "check_input_size", "check_result_size"]


def _from_env(name: str, default: int) -> int:
    raw = os.environ.get(f"CMHASH_{name}")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ResourceLimitError(f"CMHASH_{name}={raw!r} is not an integer number of bytes") from None


#: Largest array a search or distance call may allocate for its result, in bytes.
MAX_RESULT_BYTES = _from_env("MAX_RESULT_BYTES", 8 << 30)


#: Largest model bundle :func:`cmhash.bundle.load_bundle` reads (all its files together), in bytes.
MAX_BUNDLE_BYTES = _from_env("MAX_BUNDLE_BYTES", 16 << 30)

#: Largest array the command line loads from one ``.npy``/``.npz`` input, in bytes (as declared
#: by the file, checked before anything is inflated).
MAX_INPUT_BYTES = _from_env("MAX_INPUT_BYTES", 16 << 30)

#: Largest metadata an index carries (its JSON text, UTF-8), in bytes: metadata describes the
#: codes (where they come from), it is no place for per-item data.
MAX_METADATA_BYTES = _from_env("MAX_METADATA_BYTES", 1 << 20)


#: Most bytes read from a file object given as an image (``Encoder.hash(fh)``); paths are
#: streamed by the decoder and need no such bound.
MAX_IMAGE_BYTES = _from_env("MAX_IMAGE_BYTES", 1 << 30)


#: Largest height or width a bundle's image preprocessing may resize to (models take 224 to
#: a few hundred; 8192 a side is already 0.75 GiB per float32 image).
MAX_IMAGE_SIDE = _from_env("MAX_IMAGE_SIDE", 8192)

#: Most results one query of ``cmhash query`` or ``cmhash serve`` may ask for (its k, and the
#: most hits a radius query returns).
MAX_QUERY_K = _from_env("MAX_QUERY_K", 1000)

#: Longest query text ``cmhash query`` and ``cmhash serve`` take, in characters.
MAX_QUERY_TEXT_CHARS = _from_env("MAX_QUERY_TEXT_CHARS", 10_000)

#: Largest request body ``cmhash serve`` reads (an uploaded query image), in bytes.
MAX_UPLOAD_BYTES = _from_env("MAX_UPLOAD_BYTES", 16 << 20)


def check_input_size(what: str, nbytes: int) -> None:
    """Raise ResourceLimitError when an input declares more than MAX_INPUT_BYTES."""
    if nbytes > MAX_INPUT_BYTES:
        raise ResourceLimitError(
            f"{what} would take {nbytes / 2**30:.1f} GiB in memory, over the limit of "
            f"{MAX_INPUT_BYTES / 2**30:.1f} GiB; split the input or raise cmhash.limits.MAX_INPUT_BYTES "
            "(env CMHASH_MAX_INPUT_BYTES)"
        )


def check_result_size(func: str, what: str, nbytes: int) -> None:
    """Raise ResourceLimitError when a result of ``nbytes`` would exceed MAX_RESULT_BYTES."""
    if nbytes > MAX_RESULT_BYTES:
        raise ResourceLimitError(
            f"{func}: the result ({what}) would take {nbytes / 2**30:.1f} GiB, over the limit of "
            f"{MAX_RESULT_BYTES / 2**30:.1f} GiB; ask for less (fewer queries at a time, a smaller k) "
            "or raise cmhash.limits.MAX_RESULT_BYTES (env CMHASH_MAX_RESULT_BYTES)"
        )
