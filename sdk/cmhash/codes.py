"""Packed binary codes.

A code of ``bits`` bits is stored as ``bits // 8`` bytes (uint8), one row per item.
Bit ``i`` of a code is bit ``i % 8`` of byte ``i // 8``, least significant bit first:
the order FAISS uses for its binary indexes (``faiss.real_to_binary``), numpy's
``packbits(..., bitorder="little")`` and ``bitarray(endian="little")``. A set bit means
+1, a clear bit -1. Codes can be handed to FAISS ``IndexBinary*`` unchanged.

Other tools pack most significant bit first (``numpy.packbits``' default, sentence-transformers'
``ubinary``): ``bitorder="big"`` on :func:`pack_codes` / :func:`unpack_codes` reads and writes
that order, and :func:`convert_bitorder` turns one into the other. Hamming distances are the
same in both orders; only which bit is which dimension differs (see docs/interop.md).
"""

from __future__ import annotations

from typing import Iterable, Literal

import numpy as np
from bitarray import bitarray

from .errors import ArgumentTypeError, CodeFormatError, InvalidArgumentError

BIT_ORDER = "little"
BIT_ORDERS = ("little", "big")
# byte -> the same byte with its 8 bits in reverse order: little <-> big bit order
_REVERSED = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
_REVERSED = np.packbits(_REVERSED, axis=1, bitorder="big")[:, 0]


def check_bitorder(bitorder, func: str) -> str:
    """``bitorder`` if it is ``"little"`` or ``"big"``, else an InvalidArgumentError."""
    if bitorder not in BIT_ORDERS:
        raise InvalidArgumentError(f"{func}: bitorder must be 'little' (cmhash, FAISS, Milvus) or 'big' "
                                   f"(numpy.packbits' default), got {bitorder!r}")
    return bitorder


def convert_bitorder(packed, from_order: str, to_order: str) -> np.ndarray:
    """Packed codes in ``from_order`` re-packed in ``to_order`` (each byte's bits reversed when
    the orders differ; the same array when they agree)."""
    check_bitorder(from_order, "convert_bitorder")
    check_bitorder(to_order, "convert_bitorder")
    arr = as_packed(packed, "convert_bitorder", "packed")
    return arr if from_order == to_order else _REVERSED[arr]


def check_bits(bits, what: str = "bits", error: type[Exception] = CodeFormatError) -> int:
    """The one rule for a code length: a positive multiple of 8, since codes are packed
    8 bits per byte. Returns ``bits`` as an int; otherwise raises ``error`` (the caller's
    error type, e.g. a config or bundle error) with a message that starts with ``what``."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits <= 0 or bits % 8:
        raise error(f"{what} must be a positive multiple of 8 (codes are packed 8 bits per byte), got {bits!r}")
    return int(bits)


def _only_zeros_and_ones(arr: np.ndarray) -> bool:
    """True for bool arrays and arrays holding only 0 and 1. The first row is looked at
    first: ±1 and real-valued codes almost always show a non-0/1 value there, which
    spares the pass over the whole array."""
    if arr.dtype == bool:
        return True
    if not np.isin(arr[:1], (0, 1)).all():
        return False
    return bool(np.isin(arr, (0, 1)).all())


def pack_codes(codes, input: Literal["auto", "sign", "binary"] = "auto", bitorder: str = BIT_ORDER) -> np.ndarray:
    """Pack codes into uint8 bytes, 8 bits per byte, least significant bit first (``bitorder="big"``:
    most significant first, for tools that expect it; cmhash's own calls take little).

    Args:
        codes: array-like of shape (n, bits) or (bits,), with ``bits`` a multiple of 8.
            Values are read as ``input`` says.
        input: ``"sign"``: real values, +1 where ``x >= 0`` (so 0 counts as +1, as the
            papers' ``sign`` with 0 -> +1), -1 elsewhere; this covers ±1 codes and tanh
            outputs. ``"binary"``: 0/1 or bool values. ``"auto"`` (default): bool arrays
            and arrays holding only 0 and 1 are binary, everything else is sign.

    Returns:
        uint8 array of shape (n, bits // 8), or (bits // 8,) for a 1-D input.
    """
    arr = np.asarray(codes)
    if arr.ndim not in (1, 2):
        raise CodeFormatError(f"pack_codes: codes must be 1-D or 2-D (n, bits), got shape {arr.shape}")
    check_bits(arr.shape[-1], "pack_codes: the number of bits")
    if arr.dtype.kind not in "biuf":
        raise CodeFormatError(f"pack_codes: codes must be numeric or bool, got dtype {arr.dtype}")
    check_bitorder(bitorder, "pack_codes")
    if input not in ("auto", "sign", "binary"):
        raise InvalidArgumentError(f"pack_codes: input must be 'auto', 'sign' or 'binary', got {input!r}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise CodeFormatError("pack_codes: codes contain NaN or inf; check the model's outputs")
    is_binary = _only_zeros_and_ones(arr)
    if input == "auto":
        input = "binary" if is_binary else "sign"
    if input == "binary":
        if not is_binary:
            raise CodeFormatError("pack_codes: input='binary' needs values 0/1 or bool")
        bits = arr.astype(bool, copy=False)
    else:
        if arr.dtype.kind == "u":
            raise CodeFormatError(
                "pack_codes: unsigned values other than 0/1 cannot be signs; already packed codes "
                "need no packing, 0/1 bits take input='binary'"
            )
        bits = arr >= 0
    return np.packbits(bits, axis=-1, bitorder=bitorder)


def unpack_codes(packed, bits: int | None = None, signed: bool = False, bitorder: str = BIT_ORDER) -> np.ndarray:
    """Unpack uint8 codes (n, nbytes) into (n, bits): 0/1 uint8, or ±1 int8 with ``signed``.
    ``bitorder`` is the order the codes were packed in (``"big"``: most significant bit first)."""
    check_bitorder(bitorder, "unpack_codes")
    arr = as_packed(packed, "unpack_codes", "packed")
    if bits is not None and bits != arr.shape[1] * 8:
        raise CodeFormatError(
            f"unpack_codes: bits={bits} does not match codes of {arr.shape[1]} bytes ({arr.shape[1] * 8} bits)"
        )
    out = np.unpackbits(arr, axis=1, bitorder=bitorder)
    if signed:
        return (out.astype(np.int8) * 2 - 1).astype(np.int8)
    return out


def to_bitarrays(packed) -> list[bitarray]:
    """One ``bitarray(endian="little")`` per code; ``ba[i]`` is bit i of the code."""
    arr = as_packed(packed, "to_bitarrays", "packed")
    out = []
    for row in arr:
        ba = bitarray(endian=BIT_ORDER)
        ba.frombytes(row.tobytes())
        out.append(ba)
    return out


def from_bitarrays(codes: Iterable[bitarray]) -> np.ndarray:
    """Pack bitarrays (all of one length, a multiple of 8) into uint8 codes (n, nbytes)."""
    rows = []
    length = None
    for i, ba in enumerate(codes):
        if not isinstance(ba, bitarray):
            raise ArgumentTypeError(f"from_bitarrays: item {i} is {type(ba).__name__}, not bitarray")
        if length is None:
            length = len(ba)
            check_bits(length, "from_bitarrays: the length")
        elif len(ba) != length:
            raise CodeFormatError(f"from_bitarrays: item {i} has {len(ba)} bits, item 0 has {length}")
        if ba.endian != BIT_ORDER:  # the bits, not the bytes, are what a code means
            ba = bitarray(ba, endian=BIT_ORDER)
        rows.append(ba.tobytes())
    if length is None:
        raise CodeFormatError("from_bitarrays: no codes given; the bit length is unknown")
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), length // 8).copy()


def as_packed(codes, func: str, name: str = "codes", bits: int | None = None) -> np.ndarray:
    """Validate packed codes: uint8, 2-D (a 1-D input is one code), C-contiguous.

    No dtype is guessed (a cast would be a silent error): anything but uint8 raises and
    points at ``pack_codes``. Non-contiguous uint8 is copied, which changes nothing.
    """
    if not isinstance(codes, np.ndarray):
        codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise CodeFormatError(
            f"{func}: {name} must be packed uint8 codes of shape (n, bits/8), got dtype {codes.dtype}; "
            "pack ±1, 0/1 or real-valued codes with cmhash.pack_codes first"
        )
    if codes.ndim == 1:
        codes = codes[None, :]
    if codes.ndim != 2:
        raise CodeFormatError(f"{func}: {name} must be 2-D (n, bits/8), got shape {codes.shape}")
    if codes.shape[1] == 0:
        raise CodeFormatError(f"{func}: {name} have zero bytes per code")
    if bits is not None and codes.shape[1] * 8 != bits:
        raise CodeFormatError(
            f"{func}: {name} are {codes.shape[1] * 8}-bit codes ({codes.shape[1]} bytes) but "
            f"{bits}-bit codes are expected"
        )
    return np.ascontiguousarray(codes)


def ensure_packed(codes, func: str, name: str = "codes") -> np.ndarray:
    """uint8 is taken as packed codes (validated, never guessed at); any other dtype
    (±1, bool, real-valued) is packed with :func:`pack_codes` first."""
    arr = np.asarray(codes)
    if arr.dtype == np.uint8:
        return as_packed(arr, func, name)
    return as_packed(pack_codes(arr), func, name)
