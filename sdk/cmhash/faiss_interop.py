"""Hand-off between :class:`~cmhash.index.HashIndex` and FAISS's binary indexes.

FAISS packs bits as cmhash does (least significant bit first, ``faiss.real_to_binary``), so
codes pass unchanged and both give the same Hamming distances::

    fi = to_faiss(index)                   # faiss.IndexBinaryIDMap2 over an IndexBinaryFlat, same ids
    faiss.write_index_binary(fi, "codes.faissbin")
    index = from_faiss(faiss.read_index_binary("codes.faissbin"))

``write_faiss(index, path)`` writes such a file atomically (``cmhash index export --format
faiss``). faiss is optional (``pip install "cmhash-sdk[faiss]"``) and imported only here.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import ArgumentTypeError, InvalidArgumentError, MissingExtraError
from .files import atomic_path
from .index import HashIndex

__all__ = ["to_faiss", "from_faiss", "write_faiss"]


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingExtraError('the FAISS hand-off needs faiss: pip install "cmhash-sdk[faiss]"') from None
    return faiss


def to_faiss(index: HashIndex, with_ids: bool = True):
    """A FAISS binary index holding ``index``'s codes: an ``IndexBinaryIDMap2`` (over an
    ``IndexBinaryFlat``) with the same ids, or with ``with_ids=False`` a bare
    ``IndexBinaryFlat`` (whose labels are positions, i.e. insertion order)."""
    faiss = _faiss()
    if not isinstance(index, HashIndex):
        raise ArgumentTypeError(f"to_faiss: expected a HashIndex, got {type(index).__name__}")
    codes, ids = index.codes, index.ids
    flat = faiss.IndexBinaryFlat(index.bits)
    if not with_ids:
        flat.add(np.ascontiguousarray(codes))
        return flat
    mapped = faiss.IndexBinaryIDMap2(flat)
    mapped.own_fields = True  # the map keeps the flat index alive once this function returns
    flat.this.disown()
    mapped.add_with_ids(np.ascontiguousarray(codes), np.ascontiguousarray(ids, dtype=np.int64))
    return mapped


def from_faiss(faiss_index) -> HashIndex:
    """A :class:`HashIndex` with the codes of a FAISS binary index: ``IndexBinaryIDMap`` /
    ``IndexBinaryIDMap2`` keep their ids, any other index (``IndexBinaryFlat``, ``IndexBinaryHNSW``...)
    numbers its codes 0..n-1, as its labels are. The index must be able to give its codes back
    (``reconstruct_n``); IVF indexes need ``make_direct_map()`` first."""
    faiss = _faiss()
    if not isinstance(faiss_index, faiss.IndexBinary):
        raise ArgumentTypeError(f"from_faiss: expected a faiss binary index, got {type(faiss_index).__name__}")
    fi = faiss.downcast_IndexBinary(faiss_index)
    ids = None
    if isinstance(fi, (faiss.IndexBinaryIDMap, faiss.IndexBinaryIDMap2)):
        ids = faiss.vector_to_array(fi.id_map).astype(np.int64)
        inner = faiss.downcast_IndexBinary(fi.index)
    else:
        inner = fi
    n = inner.ntotal
    try:
        codes = inner.reconstruct_n(0, n) if n else np.empty((0, inner.d // 8), np.uint8)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"from_faiss: {type(inner).__name__} cannot give its codes back ({exc}); "
                                   "for an IVF index call make_direct_map() first") from None
    index = HashIndex(int(inner.d))
    index.add(np.asarray(codes, dtype=np.uint8).reshape(n, inner.d // 8), ids)
    return index


def write_faiss(index: HashIndex, path) -> None:
    """Write ``index`` as a FAISS binary index file (``faiss.read_index_binary`` opens it: an
    ``IndexBinaryIDMap2`` with the same ids), atomically."""
    faiss = _faiss()
    fi = to_faiss(index)
    with atomic_path(os.fspath(path)) as tmp:
        faiss.write_index_binary(fi, str(tmp))
