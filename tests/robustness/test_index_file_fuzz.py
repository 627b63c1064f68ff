"""Fuzzing of index files: random byte flips, truncations, extensions and header rewrites of
valid files of every kind (with metadata, names and tables; multi-index tables in the rank
layout that save writes and in the positions layout that load converts). Loading either gives an index
that searches like a fresh one of the same codes, or raises IndexFileError or
ResourceLimitError; it never crashes or returns something inconsistent."""

import struct
import zlib

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from cmhash.errors import IndexFileError, ResourceLimitError  # noqa: E402
from cmhash.index import HashIndex, MultiIndex, load_index, mih  # noqa: E402
from fixtures.mih_files import write_positions_layout  # noqa: E402

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
KINDS = {"flat": lambda bits: HashIndex(bits, metadata={"m": "x"}),
         "mih": lambda bits: MultiIndex(bits, substrings=2, metadata={"m": "x"})}


def _blob(kind: str, n: int, bits: int) -> bytes:
    import os
    import tempfile

    rng = np.random.default_rng(n)
    codes = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.cmhidx")
        if kind == "mih-positions":
            write_positions_layout(path, codes, np.arange(n), 2, 2)
        else:
            index = KINDS[kind](bits)
            index.add(codes, names=[f"i{i}" if i % 3 else None for i in range(n)])
            index.save(path)
        with open(path, "rb") as f:
            return f.read()


BLOBS = {(kind, n): _blob(kind, n, 32) for kind in KINDS for n in (0, 3, 200)}
BLOBS.update({("mih-positions", n): _blob("mih-positions", n, 32) for n in (3, 200)})


@st.composite
def damaged(draw):
    key = draw(st.sampled_from(sorted(BLOBS)))
    data = bytearray(BLOBS[key])
    how = draw(st.sampled_from(["flip", "truncate", "extend", "field"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
    elif how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "extend":
        data += draw(st.binary(min_size=1, max_size=200))
    else:  # a header field rewritten with a valid header CRC
        offset, fmt = draw(st.sampled_from([(16, "<I"), (24, "<Q"), (32, "<Q"), (40, "<Q"), (52, "<I"), (56, "<I")]))
        struct.pack_into(fmt, data, offset, draw(st.integers(0, 2**32 - 1)))
        struct.pack_into("<I", data, 60, zlib.crc32(bytes(data[:60])))
    return key, bytes(data)


@SETTINGS
@given(damaged(), st.booleans())
def test_damaged_files_load_consistently_or_raise_typed_errors(tmp_path_factory, case, mmap):
    key, blob = case
    mih.MIN_CODES, mih.SCAN_COST = 1, 1e9  # search through whatever tables were loaded
    path = tmp_path_factory.mktemp("fuzz") / "x.cmhidx"
    path.write_bytes(blob)
    try:
        index = load_index(path, mmap=mmap)
    except (IndexFileError, ResourceLimitError):
        return
    # Loaded: it must be internally consistent and searchable.
    q = np.zeros((2, index.nbytes), np.uint8)
    D, I = index.search(q, 5)
    assert set(I[I >= 0].tolist()) <= set(index.ids.tolist())
    assert len(index.names(index.ids)) == len(index)
    lims, D, I = index.range_search(q, index.bits)
    assert lims[-1] == 2 * len(index)


@pytest.fixture(autouse=True)
def _restore_cost_model():
    saved = mih.MIN_CODES, mih.SCAN_COST
    yield
    mih.MIN_CODES, mih.SCAN_COST = saved
