"""Parquet codes files (cmhash.parquet): layout, round trips, parts, bit order, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from cmhash import pack_codes, unpack_codes  # noqa: E402
from cmhash import parquet as cp  # noqa: E402
from cmhash.codes import convert_bitorder  # noqa: E402
from cmhash.errors import CodeFormatError, CodesFileError, InvalidArgumentError, ResourceLimitError  # noqa: E402


def _codes(n, bits=64, seed=0):
    return pack_codes(np.random.default_rng(seed).standard_normal((n, bits)))


def test_schema_fields_and_metadata():
    schema = cp.codes_schema(128, bundle_fingerprint="abc")
    assert [(f.name, str(f.type), f.nullable) for f in schema] == [
        ("id", "int64", False), ("name", "string", True), ("code", "fixed_size_binary[16]", False)]
    assert schema.metadata == {b"cmhash.format": b"cmhash-codes/1", b"cmhash.bits": b"128",
                               b"cmhash.bitorder": b"little", b"cmhash.bundle_fingerprint": b"abc"}
    assert b"cmhash.bundle_fingerprint" not in cp.codes_schema(8).metadata
    with pytest.raises(InvalidArgumentError):
        cp.codes_schema(12)
    with pytest.raises(InvalidArgumentError):
        cp.codes_schema(8, bitorder="middle")


def test_round_trip_file(tmp_path):
    codes = _codes(7)
    ids = np.array([5, 3, 9, 100, 2**40, 0, 7])
    names = ["a.jpg", None, "c", "d", "é", "f", "g"]
    cp.write_table(cp.codes_table(ids, codes, names, bundle_fingerprint="fp"), tmp_path / "c.parquet")
    got = cp.read_codes(tmp_path / "c.parquet")
    assert got.codes.dtype == np.uint8 and got.codes.shape == (7, 8)
    np.testing.assert_array_equal(got.codes, codes)
    np.testing.assert_array_equal(got.ids, ids)
    assert got.ids.dtype == np.int64
    assert got.names == names and got.bits == 64 and got.bundle_fingerprint == "fp" and got.bitorder == "little"
    assert not got.codes.flags.writeable  # a view of Arrow's buffer
    # any Parquet reader sees plain bytes per row
    assert pq.read_table(tmp_path / "c.parquet").column("code")[1].as_py() == codes[1].tobytes()


def test_folder_of_parts_read_in_name_order(tmp_path):
    codes, ids = _codes(10), np.arange(10) * 3
    table = cp.codes_table(ids, codes)
    (tmp_path / "ds").mkdir()
    cp.write_table(table.slice(6), tmp_path / "ds" / "part-00002.parquet")
    cp.write_table(table.slice(0, 6), tmp_path / "ds" / "part-00001.parquet")
    (tmp_path / "ds" / "_SUCCESS").write_text("")  # what Spark leaves beside its parts
    got = cp.read_codes(tmp_path / "ds")
    np.testing.assert_array_equal(got.codes, codes)
    np.testing.assert_array_equal(got.ids, ids)
    assert got.names == [None] * 10


def test_fsspec_url(tmp_path):
    pytest.importorskip("fsspec")
    codes = _codes(3)
    cp.write_table(cp.codes_table([1, 2, 3], codes), f"file://{tmp_path}/u.parquet")
    np.testing.assert_array_equal(cp.read_codes(f"file://{tmp_path}/u.parquet").codes, codes)


def test_parts_that_disagree_are_refused(tmp_path):
    (tmp_path / "ds").mkdir()
    cp.write_table(cp.codes_table([0], _codes(1), bundle_fingerprint="one"), tmp_path / "ds" / "a.parquet")
    cp.write_table(cp.codes_table([1], _codes(1), bundle_fingerprint="two"), tmp_path / "ds" / "b.parquet")
    with pytest.raises(CodesFileError, match="bundle_fingerprint"):
        cp.read_codes(tmp_path / "ds")
    cp.write_table(cp.codes_table([1], _codes(1, bits=128), bundle_fingerprint="one"), tmp_path / "ds" / "b.parquet")
    with pytest.raises(CodesFileError, match="bits"):
        cp.read_codes(tmp_path / "ds")


def test_big_bit_order_file_is_read_as_cmhash_order(tmp_path):
    rng = np.random.default_rng(1)
    bits01 = rng.integers(0, 2, (6, 32))
    big = np.packbits(bits01, axis=1)  # numpy's default: most significant bit first
    cp.write_table(cp.codes_table(np.arange(6), big, bitorder="big"), tmp_path / "b.parquet")
    got = cp.read_codes(tmp_path / "b.parquet")
    assert got.bitorder == "big"
    np.testing.assert_array_equal(got.codes, pack_codes(bits01, input="binary"))
    np.testing.assert_array_equal(unpack_codes(got.codes), bits01)
    np.testing.assert_array_equal(convert_bitorder(got.codes, "little", "big"), big)


def test_bad_inputs(tmp_path):
    with pytest.raises(CodeFormatError):
        cp.codes_table([0, 1], np.zeros((2, 8), np.int64))
    with pytest.raises(CodeFormatError):
        cp.codes_table([0, 1], np.zeros((2, 8), np.uint8), bits=32)
    with pytest.raises(InvalidArgumentError):
        cp.codes_table([0], np.zeros((2, 8), np.uint8))
    with pytest.raises(InvalidArgumentError):
        cp.codes_table([0.5, 1.0], np.zeros((2, 8), np.uint8))
    with pytest.raises(InvalidArgumentError):
        cp.codes_table([0, 1], np.zeros((2, 8), np.uint8), names=["a"])
    with pytest.raises(CodesFileError, match="no such"):
        cp.read_codes(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CodesFileError, match="not a readable Parquet"):
        cp.read_codes(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"id": [1], "code": pa.array([b"\x01\x02"], pa.binary())}), tmp_path / "var.parquet")
    with pytest.raises(CodesFileError, match="fixed_size_binary"):
        cp.read_codes(tmp_path / "var.parquet")
    pq.write_table(pa.table({"id": [1], "vec": pa.array([b"\x01"], pa.binary(1))}), tmp_path / "nocode.parquet")
    with pytest.raises(CodesFileError, match="no 'code' column"):
        cp.read_codes(tmp_path / "nocode.parquet")
    pq.write_table(pa.table({"id": [1, None], "code": pa.array([b"\x01", b"\x02"], pa.binary(1))}), tmp_path / "n.parquet")
    with pytest.raises(CodesFileError, match="nulls"):
        cp.read_codes(tmp_path / "n.parquet")
    schema = cp.codes_schema(8).with_metadata({b"cmhash.bits": b"16"})
    pq.write_table(pa.table({"id": [1], "name": ["x"], "code": pa.array([b"\x01"], pa.binary(1))}, schema=schema),
                   tmp_path / "lie.parquet")
    with pytest.raises(CodesFileError, match="inconsistent"):
        cp.read_codes(tmp_path / "lie.parquet")


def test_size_limit_checked_before_reading(tmp_path, monkeypatch):
    import cmhash.limits

    cp.write_table(cp.codes_table(np.arange(100), _codes(100)), tmp_path / "c.parquet")
    monkeypatch.setattr(cmhash.limits, "MAX_INPUT_BYTES", 799)
    with pytest.raises(ResourceLimitError):
        cp.read_codes(tmp_path / "c.parquet")


def test_write_is_atomic(tmp_path):
    target = tmp_path / "c.parquet"
    cp.write_table(cp.codes_table([1], _codes(1)), target)
    before = target.read_bytes()
    with pytest.raises(Exception):
        cp.write_table("not a table", target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.parquet"]


def test_errors_table_matches_errors_jsonl_fields(tmp_path):
    rows = [{"id": 4, "item": "x.jpg", "reason": "ImageDecodeError: truncated"}]
    assert [f.name for f in cp.ERRORS_SCHEMA] == ["id", "item", "reason"]
    cp.write_table(cp.errors_table(rows), tmp_path / "e.parquet")
    assert cp.read_errors(tmp_path / "e.parquet") == rows
    assert json.loads(json.dumps(rows[0])) == cp.read_errors(tmp_path / "e.parquet")[0]
    with pytest.raises(InvalidArgumentError):
        cp.errors_table([{"id": 1}])
