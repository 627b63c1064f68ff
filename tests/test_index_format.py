"""Index format 1.1: the index kind in the header, sections after the ids (metadata, item
names), 1.0 files, damaged sections, names through add/remove/save/load, metadata limits,
and what cmhash index build takes from cmhash encode's output."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from cmhash import HashIndex, limits
from cmhash.cli import main
from cmhash.errors import ArgumentTypeError, IndexFileError, InvalidArgumentError, ResourceLimitError, UnknownIdError
from cmhash.index import load_index


def codes(n, nbytes=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, nbytes), dtype=np.uint8)


def v10_bytes(c: np.ndarray, ids: np.ndarray, next_id: int) -> bytes:
    """A version 1.0 file built by hand from its documented layout."""
    codes_bytes = c.tobytes()
    payload = codes_bytes + bytes(-len(codes_bytes) % 64) + ids.astype("<i8").tobytes()
    head = struct.pack("<8sHHIIIQQQI8s", b"CMHIDX\x00\x01", 1, 0, 0, c.shape[1] * 8, 64, len(c), next_id,
                       len(payload), zlib.crc32(payload), bytes(8))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


@pytest.mark.parametrize("mmap", [False, True])
def test_version_1_0_files_still_load(tmp_path, mmap):
    c, ids = codes(37, 9), np.arange(37) * 5
    path = tmp_path / "old.cmhidx"
    path.write_bytes(v10_bytes(c, ids, 500))
    for index in (HashIndex.load(path, mmap=mmap), load_index(path, mmap=mmap)):
        assert type(index) is HashIndex and index.kind == "flat"
        assert np.array_equal(index.codes, c) and np.array_equal(index.ids, ids)
        assert index.metadata == {} and not index.has_names and index.bundle_fingerprint is None
        assert index.names([5, 10]) == [None, None]
        assert index.add(codes(1, 9, seed=1)).tolist() == [500]
    # A 1.0 file has nothing after the ids.
    path.write_bytes(v10_bytes(c, ids, 500) + bytes(64))
    with pytest.raises(IndexFileError, match="unexpected bytes"):
        HashIndex.load(path)


def test_header_layout_of_version_1_1(tmp_path):
    index = HashIndex(24, metadata={"a": 1})
    index.add(codes(5, 3), names=["x", None, "z", "", "é"])
    path = tmp_path / "new.cmhidx"
    index.save(path)
    data = path.read_bytes()
    major, minor, _, bits, offset, count, next_id, payload_len, payload_crc, kind, reserved, head_crc = \
        struct.unpack_from("<HHIIIQQQIIII", data, 8)
    assert (major, minor, bits, offset, count, next_id, kind, reserved) == (1, 1, 24, 64, 5, 5, 0, 0)
    assert head_crc == zlib.crc32(data[:60])
    # The payload is exactly codes, padding and ids, as in 1.0.
    assert payload_len == 15 + 49 + 40 and payload_crc == zlib.crc32(data[64 : 64 + payload_len])
    assert np.frombuffer(data, "<i8", 5, 64 + 64).tolist() == [0, 1, 2, 3, 4]
    # The section table starts at the next multiple of 64 after the payload.
    table = 64 + payload_len + (-(64 + payload_len) % 64)
    magic, n, entries_crc = struct.unpack_from("<8sII", data, table)
    assert magic == b"CMHSECT\x00" and n == 3
    entries = data[table + 16 : table + 16 + 24 * n]
    assert zlib.crc32(entries) == entries_crc
    found = {}
    for i in range(n):
        tag, crc, off, length = struct.unpack_from("<4sIQQ", entries, 24 * i)
        assert off % 64 == 0 and zlib.crc32(data[off : off + length]) == crc
        found[tag] = data[off : off + length]
    assert json.loads(found[b"META"]) == {"a": 1}
    assert np.frombuffer(found[b"NOFF"], "<i8").tolist() == [0, 1, 1, 2, 2, 4]
    assert found[b"NAME"] == "xzé".encode()
    assert off + length == len(data)


@pytest.mark.parametrize("mmap", [False, True])
def test_names_and_metadata_round_trip_through_remove(tmp_path, mmap):
    meta = {"bundle_fingerprint": "ab" * 32, "modality": "image", "nested": [1, {"x": None}]}
    index = HashIndex(64, metadata=meta)
    index.add(codes(4), ids=[10, 11, 12, 13])  # no names yet
    index.add(codes(3, seed=1), ids=[20, 21, 22], names=["a.jpg", None, "dir/ü.png"])
    index.add(codes(2, seed=2), ids=[30, 31])  # again without names
    assert index.names([21, 22, 10, 31]) == [None, "dir/ü.png", None, None]
    assert index.bundle_fingerprint == "ab" * 32 and index.metadata == meta
    assert index.remove([20, 11, 999]) == 2
    assert index.names([22, 21]) == ["dir/ü.png", None]
    with pytest.raises(UnknownIdError, match="e.g. 20") as info:
        index.names([22, 20])
    assert isinstance(info.value, KeyError)
    path = tmp_path / "n.cmhidx"
    index.save(path)
    loaded = load_index(path, mmap=mmap)
    assert loaded.has_names and loaded.metadata == meta and loaded.bundle_fingerprint == "ab" * 32
    assert np.array_equal(loaded.ids, index.ids)
    assert loaded.names(loaded.ids) == index.names(index.ids) == [None, None, None, None, "dir/ü.png", None, None]
    # Changes after a (mapped) load: copy-on-write keeps the names in step.
    loaded.add(codes(2, seed=3), ids=[40, 41], names=["p", "q"])
    assert loaded.remove([22]) == 1
    assert loaded.names([41, 40, 21]) == ["q", "p", None]
    loaded.save(path)
    again = HashIndex.load(path, mmap=mmap)
    assert again.names(again.ids) == [None, None, None, None, None, None, "p", "q"]
    assert again.remove(again.ids) == 8 and again.names([]) == []


def test_many_names_after_random_removals_match_a_dict():
    rng = np.random.default_rng(5)
    index, expected = HashIndex(16), {}
    for step in range(30):
        n = int(rng.integers(1, 50))
        named = rng.random() < 0.7
        names = [f"item-{step}-{i}" * int(rng.integers(0, 3)) or None for i in range(n)] if named else None
        ids = index.add(codes(n, 2, seed=step), names=names)
        expected.update(zip(ids.tolist(), names or [None] * n))
        gone = rng.choice(ids, size=n // 3, replace=False)
        index.remove(gone)
        for g in gone.tolist():
            expected.pop(g)
    keys = list(expected)
    assert index.names(keys) == [expected[k] for k in keys]


def test_bad_names_and_metadata_are_typed(monkeypatch):
    index = HashIndex(8)
    with pytest.raises(InvalidArgumentError, match="2 names for 3 codes"):
        index.add(codes(3, 1), names=["a", "b"])
    with pytest.raises(ArgumentTypeError, match="str or None"):
        index.add(codes(2, 1), names=["a", 5])
    with pytest.raises(ArgumentTypeError, match="sequence of str"):
        index.add(codes(1, 1), names="a")
    assert len(index) == 0
    with pytest.raises(ArgumentTypeError, match="dict"):
        HashIndex(8, metadata=[1])
    with pytest.raises(ArgumentTypeError, match="JSON-able"):
        HashIndex(8, metadata={"x": object()})
    with pytest.raises(ArgumentTypeError, match="JSON-able"):
        HashIndex(8, metadata={"x": float("nan")})
    monkeypatch.setattr(limits, "MAX_METADATA_BYTES", 100)
    with pytest.raises(ResourceLimitError, match="MAX_METADATA_BYTES"):
        HashIndex(8, metadata={"x": "y" * 200})
    with pytest.raises(ResourceLimitError):
        index.metadata = {"x": "y" * 200}
    index.metadata = {"x": "y"}
    assert index.metadata == {"x": "y"}


def test_oversized_metadata_in_a_file_is_refused(tmp_path, monkeypatch):
    index = HashIndex(8, metadata={"x": "y" * 500})
    index.save(tmp_path / "m.cmhidx")
    monkeypatch.setattr(limits, "MAX_METADATA_BYTES", 100)
    with pytest.raises(ResourceLimitError, match="MAX_METADATA_BYTES"):
        HashIndex.load(tmp_path / "m.cmhidx")


def _sections(data: bytes):
    payload_len = struct.unpack_from("<Q", data, 40)[0]
    table = 64 + payload_len + (-(64 + payload_len) % 64)
    n = struct.unpack_from("<I", data, table + 8)[0]
    return table, [struct.unpack_from("<4sIQQ", data, table + 16 + 24 * i) for i in range(n)]


def _rewrite_entries(data: bytes, table: int, entries) -> bytes:
    blob = b"".join(struct.pack("<4sIQQ", *e) for e in entries)
    out = bytearray(data)
    out[table + 16 : table + 16 + len(blob)] = blob
    struct.pack_into("<I", out, table + 12, zlib.crc32(blob))
    return bytes(out)


def test_damaged_sections_raise_index_file_error(tmp_path):
    index = HashIndex(64, metadata={"k": "v"})
    index.add(codes(50), names=[f"n{i}" for i in range(50)])
    good = tmp_path / "good.cmhidx"
    index.save(good)
    data = good.read_bytes()
    table, entries = _sections(data)
    by_tag = {e[0]: e for e in entries}
    meta_off = by_tag[b"META"][2]
    noff = by_tag[b"NOFF"]
    bad_offsets = bytearray(data)
    struct.pack_into("<q", bad_offsets, noff[2] + 8, 10**9)  # an offset past the names
    fixed = [e if e[0] != b"NOFF" else (e[0], zlib.crc32(bad_offsets[e[2] : e[2] + e[3]]), e[2], e[3]) for e in entries]
    not_json = bytearray(data)
    not_json[meta_off] = ord("[")
    meta_fixed = [e if e[0] != b"META" else (e[0], zlib.crc32(not_json[e[2] : e[2] + e[3]]), e[2], e[3]) for e in entries]
    cases = {
        "section 'NAME' checksum": data[: by_tag[b"NAME"][2]] + b"X" + data[by_tag[b"NAME"][2] + 1 :],
        "section table checksum": data[: table + 20] + b"\xff" + data[table + 21 :],
        "no section table": data[:table] + b"NOTATABLE" + data[table + 9 :],
        "damaged section table": data[:table + 8] + struct.pack("<I", 10**6) + data[table + 12 :],
        "unexpected bytes after the last section": data + b"\x00",
        "misplaced": _rewrite_entries(data, table, [(t, c, o + 64, n) for t, c, o, n in entries]),
        "repeated": _rewrite_entries(data, table, [entries[0], (entries[0][0], *entries[1][1:]), entries[2]]),
        "half of the item names": _rewrite_entries(
            data, table, [e if e[0] != b"NAME" else (b"XXXX", *e[1:]) for e in entries]),
        "out of order or out of range": _rewrite_entries(bytes(bad_offsets), table, fixed),
        "not a JSON object": _rewrite_entries(bytes(not_json), table, meta_fixed),
        "truncated": data[: len(data) - 10],
    }
    bad = tmp_path / "bad.cmhidx"
    for pattern, blob in cases.items():
        bad.write_bytes(blob)
        for mmap in (False, True):
            with pytest.raises(IndexFileError, match=pattern):
                load_index(bad, mmap=mmap)
    # An unknown section is ignored (a later 1.x may add some).
    bad.write_bytes(_rewrite_entries(data, table, [e if e[0] != b"META" else (b"ZZZZ", *e[1:]) for e in entries]))
    assert HashIndex.load(bad).metadata == {} and HashIndex.load(bad).names([3]) == ["n3"]


def test_unknown_kind_is_refused(tmp_path):
    path = tmp_path / "k.cmhidx"
    HashIndex(8).save(path)
    head = bytearray(path.read_bytes())
    struct.pack_into("<I", head, 52, 7)
    struct.pack_into("<I", head, 60, zlib.crc32(bytes(head[:60])))
    path.write_bytes(bytes(head))
    with pytest.raises(IndexFileError, match="unknown index kind 7"):
        load_index(path)


def test_index_build_keeps_names_fingerprint_and_modality(tmp_path, capsys):
    out = tmp_path / "enc"
    out.mkdir()
    c = codes(6, 4)
    np.savez(out / "codes.npz", codes=c, ids=np.arange(6) * 2, names=np.asarray([f"img{i}.jpg" for i in range(6)]),
             bundle_fingerprint=np.asarray("f" * 64))
    (out / "summary.json").write_text(json.dumps({"modality": "image"}))
    idx = tmp_path / "i.cmhidx"
    assert main(["index", "build", str(out / "codes.npz"), "--out", str(idx), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"] == {"bundle_fingerprint": "f" * 64, "modality": "image"} and info["names"]
    index = load_index(idx)
    assert index.bundle_fingerprint == "f" * 64 and index.names([4, 10]) == ["img2.jpg", "img5.jpg"]
    assert main(["index", "info", str(idx)]) == 0
    text = capsys.readouterr().out
    assert "6 codes of 32 bits, flat index, with item names" in text and "bundle_fingerprint: " + "f" * 64 in text
    np.savez(out / "codes.npz", codes=c, names=np.asarray(["a", "b"]))
    assert main(["index", "build", str(out / "codes.npz"), "--out", str(idx), "--force"]) == 2
    assert "2 names for 6 codes" in capsys.readouterr().err
