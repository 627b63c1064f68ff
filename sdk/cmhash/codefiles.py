"""Reading codes files, whatever their kind: the one reader behind ``cmhash index build``,
``cmhash search`` and :class:`~cmhash.sharded.ShardedIndex`.

    .npy      a 2-D uint8 array of packed codes
    .npz      ``codes`` and optionally ``ids``, ``names`` and ``bundle_fingerprint`` (what
              ``cmhash encode`` writes as codes.npz)
    .parquet  a file or a folder of ``*.parquet`` parts (:mod:`cmhash.parquet`; needs pyarrow)

Nothing is unpickled: each ``.npy`` header is checked (no Python objects, the right number of
dimensions, a declared size within ``cmhash.limits.MAX_INPUT_BYTES``) before its data is read
or inflated.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .codes import as_packed
from .errors import CmhashError, CodeFormatError, CodesFileError
from .limits import check_input_size
from .parquet import CodeColumns

__all__ = ["CodeColumns", "load_codes", "is_parquet"]

# .npz members read, with their number of dimensions (0: a scalar)
_NPZ_ARRAYS = (("codes", 2), ("ids", 1), ("names", 1), ("bundle_fingerprint", 0))


def is_parquet(path) -> bool:
    """A ``.parquet`` file, a folder holding ``*.parquet`` parts, or a URL (read with fsspec)."""
    text = os.fspath(path)
    if "://" in text or text.endswith(".parquet"):
        return True
    return os.path.isdir(text) and any(n.endswith(".parquet") for n in os.listdir(text))


def load_codes(path) -> CodeColumns:
    """Packed codes with their ids, names, bit length and bundle fingerprint from a ``.npy``,
    an ``.npz`` or Parquet (see the module docstring); absent parts are None.

    Raises:
        CodesFileError: a missing or unreadable file, Python objects, wrong shapes.
        CodeFormatError: codes that are not uint8.
        ResourceLimitError: an input over ``cmhash.limits.MAX_INPUT_BYTES``.
        MissingExtraError: Parquet without pyarrow installed.
    """
    if is_parquet(path):
        from .parquet import read_codes

        return read_codes(path)
    p = Path(path)
    if not p.is_file():
        raise CodesFileError(f"{path}: no such file; give a .npy of packed uint8 codes, an .npz with 'codes' "
                             "or a Parquet file or folder")
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                members = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                if "codes" not in members:
                    raise CodesFileError(f"{path}: the .npz has no 'codes' array (it has {sorted(members)})")
                arrays = {}
                for name, ndim in _NPZ_ARRAYS:
                    if name in members:
                        with zf.open(f"{name}.npy") as fh:
                            arrays[name] = _read_npy(fh, f"{path}: '{name}'", ndim)
            codes, ids = arrays["codes"], arrays.get("ids")
            names = arrays.get("names")
            fingerprint = arrays.get("bundle_fingerprint")
            if names is not None and names.dtype.kind != "U":
                raise CodesFileError(f"{path}: 'names' must be strings, got dtype {names.dtype}")
            if fingerprint is not None and fingerprint.dtype.kind != "U":
                raise CodesFileError(f"{path}: 'bundle_fingerprint' must be a string, got dtype {fingerprint.dtype}")
        else:
            with open(p, "rb") as fh:
                codes, ids, names, fingerprint = _read_npy(fh, str(path), 2), None, None, None
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        if isinstance(exc, CmhashError):
            raise
        raise CodesFileError(f"{path}: not a readable .npy or .npz of packed codes ({exc})") from None
    codes = as_packed(codes, str(path), "codes")
    n = codes.shape[0]
    for what, arr in (("ids", ids), ("names", names)):
        if arr is not None and arr.shape[0] != n:
            raise CodesFileError(f"{path}: {arr.shape[0]} {what} for {n} codes")
    if ids is not None and ids.size and ids.dtype.kind not in "iu":
        raise CodeFormatError(f"{path}: 'ids' must be integers, got dtype {ids.dtype}")
    return CodeColumns(
        codes=codes,
        ids=None if ids is None else ids.astype(np.int64, copy=False),
        names=None if names is None else names.tolist(),
        bits=codes.shape[1] * 8,
        bundle_fingerprint=None if fingerprint is None else str(fingerprint),
    )


def _read_npy(fh, what: str, ndim: int) -> np.ndarray:
    """One ``ndim``-D array from an open ``.npy`` stream: header checked first, then exactly its data."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise CodesFileError(f"{what}: .npy format version {version} is not supported (write it with numpy.save)")
    if dtype.hasobject:
        raise CodesFileError(f"{what} holds Python objects (dtype {dtype}), which cmhash never unpickles; "
                             "save a numeric array")
    if len(shape) != ndim:
        raise CodesFileError(f"{what} has shape {shape}; codes are 2-D (n, bits/8), ids and names 1-D (n,), "
                             "a fingerprint a scalar")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    check_input_size(what, nbytes)
    data = fh.read(nbytes)
    if len(data) != nbytes:
        raise CodesFileError(f"{what} is truncated: {len(data):,} of {nbytes:,} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
