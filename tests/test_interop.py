"""Codes handed to and taken from neighbouring tools, one test per recipe of docs/interop.md:
bit order (numpy.packbits, sentence-transformers' ubinary, FAISS, Milvus, usearch), the FAISS
hand-off and ``cmhash index export --format faiss``, and the Milvus bulk-import layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmhash import HashIndex, hamming_distances, pack_codes, unpack_codes
from cmhash.cli import main
from cmhash.codes import convert_bitorder
from cmhash.errors import ArgumentTypeError, InvalidArgumentError


def _embeddings(n, dim=64, seed=0):
    """Real-valued vectors with no exact zeros, where 'x > 0' and 'x >= 0' agree."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    x[x == 0] = 1.0
    return x


def assert_same_neighbours(codes, ids, queries, dist, got_ids, k):
    """Another library's kNN answer is ours up to the order of equal distances: the same
    distances, each id at its true distance, and the ids strictly inside the k-th distance
    the same set (at the k-th distance any of the tied codes may fill the row)."""
    ours_d, _ = _ours(codes, ids, queries, k)
    np.testing.assert_array_equal(np.asarray(dist, dtype=np.int64), ours_d.astype(np.int64))
    true = hamming_distances(queries, codes)
    by_id = {int(i): p for p, i in enumerate(ids)}
    for row in range(len(queries)):
        row_ids = [int(i) for i in got_ids[row]]
        assert len(set(row_ids)) == k
        assert [true[row, by_id[i]] for i in row_ids] == list(ours_d[row])
        inside = true[row] < ours_d[row, -1]
        assert {i for i in row_ids if true[row, by_id[i]] < ours_d[row, -1]} == set(ids[inside].tolist())


def _ours(codes, ids, queries, k):
    index = HashIndex(codes.shape[1] * 8)
    index.add(codes, ids)
    return index.search(queries, k)


# -- bit order --------------------------------------------------------------------------

def test_numpy_packbits_default_is_big_bit_order():
    bits = np.random.default_rng(0).integers(0, 2, (9, 48)).astype(np.uint8)
    big = np.packbits(bits, axis=1)  # numpy's default: most significant bit first
    np.testing.assert_array_equal(pack_codes(bits, input="binary", bitorder="big"), big)
    np.testing.assert_array_equal(unpack_codes(big, bitorder="big"), bits)
    np.testing.assert_array_equal(np.unpackbits(convert_bitorder(big, "big", "little"), axis=1, bitorder="little"), bits)
    little = pack_codes(bits, input="binary")
    assert not np.array_equal(little, big)
    np.testing.assert_array_equal(convert_bitorder(little, "little", "big"), big)
    # the Hamming distance does not depend on the order, as long as both sides share it
    np.testing.assert_array_equal(hamming_distances(big, big), hamming_distances(little, little))
    with pytest.raises(InvalidArgumentError):
        pack_codes(bits, input="binary", bitorder="msb")


def test_sentence_transformers_ubinary():
    x = _embeddings(7, 96)
    try:
        from sentence_transformers.quantization import quantize_embeddings

        ubinary = quantize_embeddings(x, precision="ubinary")
    except ImportError:
        # Not installed here (it pulls in transformers): its ubinary is this one line, numpy's
        # default packbits of the positive components.
        ubinary = np.packbits(x > 0).reshape(x.shape[0], -1)
    np.testing.assert_array_equal(pack_codes(x > 0, input="binary", bitorder="big"), ubinary)
    # read into cmhash's order: the same bits, so the same codes cmhash packs from x
    np.testing.assert_array_equal(convert_bitorder(ubinary, "big", "little"), pack_codes(x))


def test_faiss_packs_as_cmhash():
    faiss = pytest.importorskip("faiss")
    x = _embeddings(6, 64)
    packed = np.empty((6, 8), np.uint8)
    for row in range(6):
        faiss.real_to_binary(64, faiss.swig_ptr(x[row]), faiss.swig_ptr(packed[row]))
    np.testing.assert_array_equal(packed, pack_codes(x))


def test_usearch_b1x8_round_trip_and_distances():
    usearch = pytest.importorskip("usearch.index")
    codes = pack_codes(_embeddings(60, 64, seed=3))
    keys = np.arange(60) * 5 + 1
    index = usearch.Index(ndim=64, metric="hamming", dtype="b1x8")
    index.add(keys, codes)
    np.testing.assert_array_equal(np.asarray(index.get(keys)), codes)  # bytes kept as given
    result = index.search(codes[:5], 6, exact=True)
    assert_same_neighbours(codes, keys, codes[:5], result.distances, result.keys, 6)
    # vectors usearch users packed with numpy.packbits (big order) read into cmhash's order
    bits = unpack_codes(codes)
    np.testing.assert_array_equal(convert_bitorder(np.packbits(bits, axis=1), "big", "little"), codes)


# -- FAISS hand-off ----------------------------------------------------------------------

def _index(n=80, bits=32, seed=0):
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (20, bits // 8), dtype=np.uint8)  # few distinct codes: ties
    index = HashIndex(bits)
    index.add(pool[rng.integers(0, 20, n)], rng.permutation(10 * n)[:n])
    return index, pool


def test_to_faiss_and_back():
    faiss = pytest.importorskip("faiss")
    from cmhash.faiss_interop import from_faiss, to_faiss

    index, pool = _index()
    fi = to_faiss(index)
    assert isinstance(fi, faiss.IndexBinaryIDMap2) and fi.ntotal == len(index) and fi.d == 32
    dist, ids = fi.search(pool[:6], 10)
    assert_same_neighbours(index.codes, index.ids, pool[:6], dist, ids, 10)
    back = from_faiss(fi)
    np.testing.assert_array_equal(back.codes, index.codes)
    np.testing.assert_array_equal(back.ids, index.ids)
    for a, b in zip(back.search(pool, 7), index.search(pool, 7)):
        np.testing.assert_array_equal(a, b)
    flat = to_faiss(index, with_ids=False)
    assert isinstance(flat, faiss.IndexBinaryFlat)
    np.testing.assert_array_equal(from_faiss(flat).ids, np.arange(len(index)))
    hnsw = faiss.IndexBinaryHNSW(32)
    hnsw.add(np.ascontiguousarray(index.codes))
    np.testing.assert_array_equal(from_faiss(hnsw).codes, index.codes)
    with pytest.raises(ArgumentTypeError):
        to_faiss("not an index")
    with pytest.raises(ArgumentTypeError):
        from_faiss(faiss.IndexFlatL2(8))


def test_index_export_faiss_cli(tmp_path, capsys):
    faiss = pytest.importorskip("faiss")
    index, pool = _index(n=50, bits=64, seed=2)
    index.save(tmp_path / "i.cmhidx")
    out = tmp_path / "i.faissbin"
    assert main(["index", "export", str(tmp_path / "i.cmhidx"), "--format", "faiss", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 50
    fi = faiss.read_index_binary(str(out))
    assert isinstance(faiss.downcast_IndexBinary(fi), faiss.IndexBinaryIDMap2)
    np.testing.assert_array_equal(np.sort(faiss.vector_to_array(faiss.downcast_IndexBinary(fi).id_map)),
                                  np.sort(index.ids))
    dist, ids = fi.search(pool[:5], 8)
    assert_same_neighbours(index.codes, index.ids, pool[:5], dist, ids, 8)
    assert main(["index", "export", str(tmp_path / "i.cmhidx"), "--format", "faiss", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


# -- Milvus ------------------------------------------------------------------------------

def _milvus_bytes(bool_list):
    """Milvus's documented conversion of a boolean vector to BINARY_VECTOR bytes: bit i of
    the vector is bit i % 8 of byte i // 8."""
    out = bytearray(len(bool_list) // 8)
    for i, bit in enumerate(bool_list):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def test_milvus_bulk_import_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from cmhash import parquet as cp

    bits = 128
    x = _embeddings(9, bits, seed=5)
    codes = pack_codes(x)
    names = [f"img/{i}.jpg" for i in range(9)]
    cp.write_table(cp.milvus_table(cp.codes_table(np.arange(9) + 100, codes, names, bundle_fingerprint="fp"),
                                   vector_field="embedding"), tmp_path / "milvus.parquet")
    table = pq.read_table(tmp_path / "milvus.parquet")
    # the columns Milvus's Parquet reader matches to the collection: INT64 primary key,
    # VARCHAR, and BINARY_VECTOR as binary (it takes binary or list<uint8>, not fixed_size_binary)
    assert table.schema.names == ["id", "name", "embedding"]
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("name").type == pa.string()
    assert table.schema.field("embedding").type == pa.binary()
    assert table.column("id").to_pylist() == list(range(100, 109))
    assert table.column("name").to_pylist() == names
    vectors = table.column("embedding").to_pylist()
    assert all(len(v) == bits // 8 for v in vectors)  # dim = bits, 8 dimensions a byte
    assert vectors == [_milvus_bytes(list(row >= 0)) for row in x]  # dimension i = component i
    without = cp.milvus_table(cp.codes_table([1], codes[:1], ["a"]), names=False)
    assert without.schema.names == ["id", "code"]
    with pytest.raises(InvalidArgumentError, match="little"):
        cp.milvus_table(cp.codes_table([1], codes[:1], bitorder="big"))
