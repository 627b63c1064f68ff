"""MultiIndex (multi-index hashing): results equal the flat index's on every query (ids,
distances, tie order) on random, clustered and duplicate-heavy codes at 32 to 256 bits,
through the tables and through the fallback; adds, removes, names, save/load with mmap,
the cost model's decisions, the rank layout of the tables (and files in the positions
layout), and damaged tables."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from cmhash import _hamming
from cmhash.cli import main
from cmhash.errors import ArgumentTypeError, IndexFileError, InvalidArgumentError
from cmhash.index import HashIndex, MultiIndex, _file, load_index, mih
from fixtures.mih_files import positions_tables, write_positions_layout


def clustered(n, bits, seed, clusters=40, latent=24, spread=0.3):
    """Signs of random projections of a Gaussian mixture: codes with near neighbours."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, latent))
    x = centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, latent))
    return np.packbits(x @ rng.standard_normal((latent, bits)) > 0, axis=1, bitorder="little")


def dataset(kind, n, bits, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    if kind == "clustered":
        return clustered(n, bits, seed)
    return clustered(30, bits, seed)[rng.integers(0, 30, n)]  # duplicate-heavy


@pytest.fixture
def tables_always(monkeypatch):
    """Tables for any collection and no work cap: every query goes through the tables."""
    monkeypatch.setattr(mih, "MIN_CODES", 1)
    monkeypatch.setattr(mih, "SCAN_COST", 1e9)
    monkeypatch.setattr(mih, "MAX_K_SHARE", 1.0)


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("bits", [32, 64, 128, 256])
@pytest.mark.parametrize("kind", ["random", "clustered", "duplicates"])
def test_results_equal_the_flat_index(tables_always, bits, kind):
    db = dataset(kind, 3000, bits)
    queries = np.concatenate([db[:15], dataset(kind, 15, bits, seed=1), dataset("random", 4, bits, seed=2)])
    flat, multi = HashIndex(bits), MultiIndex(bits)
    ids = np.random.default_rng(3).permutation(10**6)[:3000]
    flat.add(db, ids)
    multi.add(db, ids)
    for k in (1, 10, 100):
        assert same(flat.search(queries, k), multi.search(queries, k)), k
    for radius in (0, 2, bits // 8, bits // 3):
        assert same(flat.range_search(queries, radius), multi.range_search(queries, radius)), radius
    report = multi.explain(queries, k=10)
    assert report["path"] == "tables" and report["by_tables"] == len(queries)
    assert report["substrings"] == mih.auto_substrings(bits, 3000) and sum(report["widths"]) == bits


@pytest.mark.parametrize("substrings", [3, 4, 5, 8])
def test_any_number_of_substrings_is_exact(tables_always, substrings):
    db = dataset("clustered", 2000, 64, seed=4)
    flat, multi = HashIndex(64), MultiIndex(64, substrings=substrings)
    flat.add(db)
    multi.add(db)
    q = dataset("clustered", 20, 64, seed=5)
    assert same(flat.search(q, 7), multi.search(q, 7))
    assert same(flat.range_search(q, 9), multi.range_search(q, 9))
    assert multi.explain(q, k=7)["substrings"] == substrings


def test_adds_and_removes_stay_exact(tables_always):
    rng = np.random.default_rng(6)
    flat, multi = HashIndex(64), MultiIndex(64)
    q = dataset("clustered", 10, 64, seed=7)
    for step in range(8):
        batch = dataset("clustered", int(rng.integers(50, 400)), 64, seed=10 + step)
        flat.add(batch)
        multi.add(batch)  # codes after the last build are scanned until a rebuild
        assert same(flat.search(q, 10), multi.search(q, 10))
        gone = rng.choice(flat.ids, size=len(flat) // 10, replace=False)
        assert flat.remove(gone) == multi.remove(gone)
        assert same(flat.search(q, 10), multi.search(q, 10)), step
        assert same(flat.range_search(q, 6), multi.range_search(q, 6))


def test_fallback_is_exact_and_explained(monkeypatch):
    db = dataset("random", 5000, 64)
    q = dataset("random", 40, 64, seed=1)
    flat, multi = HashIndex(64), MultiIndex(64)
    flat.add(db)
    multi.add(db)
    report = multi.explain(q, k=5)
    assert report["path"] == "scan" and "MIN_CODES" in report["reason"]
    monkeypatch.setattr(mih, "MIN_CODES", 1000)
    report = multi.explain(q, k=5)  # random codes: the tables cannot pay off
    assert report["path"] in ("scan", "mixed") and report["gave_up"] + report["skipped"] > 0
    assert report["skipped"] > 0 and "work cap" in report["reason"]
    assert same(flat.search(q, 5), multi.search(q, 5))
    assert same(flat.range_search(q, 20), multi.range_search(q, 20))
    report = multi.explain(q, k=500)
    assert report["path"] == "scan" and "k=500" in report["reason"]
    report = multi.explain(q, radius=40)
    assert report["path"] == "scan" and "radius 40" in report["reason"]
    assert same(flat.search(q, 500), multi.search(q, 500))
    monkeypatch.setattr(mih, "SCAN_COST", 1e9)
    monkeypatch.setattr(mih, "MAX_K_SHARE", 1.0)
    assert multi.explain(q, k=5)["path"] == "tables"


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_keeps_tables_names_and_metadata(tables_always, tmp_path, mmap):
    db = dataset("clustered", 1500, 128, seed=8)
    multi = MultiIndex(128, metadata={"bundle_fingerprint": "c" * 64})
    multi.add(db, names=[f"item{i}" for i in range(1500)])
    multi.remove(np.arange(0, 1500, 7))
    path = tmp_path / "m.cmhidx"
    multi.save(path)
    loaded = load_index(path, mmap=mmap)
    assert type(loaded) is MultiIndex and loaded.kind == "mih" and loaded.bundle_fingerprint == "c" * 64
    assert loaded.table_bytes > 0  # the tables came from the file
    q = dataset("clustered", 12, 128, seed=9)
    assert same(multi.search(q, 10), loaded.search(q, 10))
    assert loaded.names([1, 8]) == ["item1", "item8"]
    loaded.add(db[:5], names=list("abcde"))  # copy-on-write of the mapped tables
    assert loaded.names([loaded.ids[-1]]) == ["e"]
    flat = HashIndex(128)
    flat.add(loaded.codes, loaded.ids)
    assert same(flat.search(q, 10), loaded.search(q, 10))
    with pytest.raises(IndexFileError, match="mih index, not a flat one.*load_index"):
        HashIndex.load(path)
    with pytest.raises(IndexFileError, match="flat index, not a mih one"):
        flat.save(tmp_path / "f.cmhidx") or MultiIndex.load(tmp_path / "f.cmhidx")
    empty = MultiIndex(64, substrings=4)
    empty.save(tmp_path / "e.cmhidx")
    assert len(load_index(tmp_path / "e.cmhidx", mmap=mmap)) == 0


def _section(data: bytes, tag: bytes):
    payload_len = struct.unpack_from("<Q", data, 40)[0]
    table = 64 + payload_len + (-(64 + payload_len) % 64)
    n = struct.unpack_from("<I", data, table + 8)[0]
    for i in range(n):
        entry = table + 16 + 24 * i
        t, crc, off, length = struct.unpack_from("<4sIQQ", data, entry)
        if t == tag:
            return table, n, entry, off, length


def _patch(data: bytes, tag: bytes, fn) -> bytes:
    """Change a section's bytes and fix its CRC and the table's: only the contents are wrong."""
    table, n, entry, off, length = _section(data, tag)
    out = bytearray(data)
    new = fn(bytes(data[off : off + length]))
    out[off : off + length] = new.ljust(length)  # JSON may be padded with spaces
    assert len(new) <= length
    struct.pack_into("<I", out, entry + 4, zlib.crc32(bytes(out[off : off + length])))
    struct.pack_into("<I", out, table + 12, zlib.crc32(bytes(out[table + 16 : table + 16 + 24 * n])))
    return bytes(out)


def _set(index: int, value: int | None = None, source: int | None = None):
    """A section rewrite: int32 entry ``index`` set to ``value`` (or to entry ``source``)."""
    def fn(b):
        arr = np.frombuffer(b, "<i4").copy()
        arr[index] = value if source is None else arr[source]
        return arr.tobytes()
    return fn


def _offsets_backwards(b):
    arr = np.frombuffer(b, "<i4").copy()
    arr[3], arr[4] = arr[4] + 1, arr[3]
    return arr.tobytes()


def test_damaged_tables_raise_index_file_error(tmp_path):
    multi = MultiIndex(64, substrings=4)
    multi.add(dataset("clustered", 300, 64))
    path = tmp_path / "m.cmhidx"
    multi.save(path)
    data = path.read_bytes()
    assert _section(data, b"MIHI") is None  # written in the rank layout
    old = tmp_path / "old.cmhidx"
    write_positions_layout(old, multi.codes, multi.ids, 4, 4)
    cases = {
        (path, "MIHR", "rank out of range"): (_set(300 + 5, 300), "damaged"),
        (path, "MIHR", "perm not a permutation"): (_set(0, source=1), "damaged"),
        (path, "MIHO", "offsets backwards"): (_offsets_backwards, "damaged"),
        (path, "MIHP", "impossible"): (lambda b: json.dumps({"substrings": 4, "start": [0, 16, 32, 48],
                                                               "width": [16, 16, 16, 30]}).encode(),
                                         "impossible multi-index parameters"),
        (old, "MIHI", "position out of range"): (_set(300 + 5, 300), "damaged"),
        (old, "MIHI", "table 0 not a permutation"): (_set(0, source=1), "damaged"),
        (old, "MIHO", "offsets backwards"): (_offsets_backwards, "damaged"),
    }
    bad = tmp_path / "bad.cmhidx"
    for (source, tag, what), (fn, pattern) in cases.items():
        bad.write_bytes(_patch(source.read_bytes(), tag.encode(), fn))
        for mmap in (False, True):
            with pytest.raises(IndexFileError, match=pattern):
                load_index(bad, mmap=mmap)
    bad.write_bytes(_patch(data, b"MIHP", lambda b: b"{not json"))
    with pytest.raises(IndexFileError, match="MIHP"):
        load_index(bad)
    other = {"substrings": 4, "start": [0, 15, 30, 45], "width": [15, 15, 15, 19]}
    bad.write_bytes(_patch(data, b"MIHP", lambda b: json.dumps(other).encode()))
    with pytest.raises(IndexFileError, match="do not match"):
        load_index(bad)
    # Both layouts, or a layout without its parameters: refused.
    loaded = load_index(path)
    sections = loaded._extra_sections()
    for extra, drop in (({b"MIHI": [_file.as_bytes(positions_tables(multi.codes, 4)[3])]}, None), ({}, b"MIHP")):
        chosen = {tag: bufs for tag, bufs in {**sections, **extra}.items() if tag != drop}
        _file.write(str(bad), kind=_file.KIND_MIH, bits=64, next_id=300, codes=multi.codes, ids=multi.ids,
                    sections=chosen)
        with pytest.raises(IndexFileError, match="part of its tables"):
            load_index(bad)


@pytest.mark.parametrize("mmap", [False, True])
def test_positions_layout_files_load_into_the_rank_layout(tables_always, tmp_path, mmap):
    """A file whose tables list positions loads into exactly the tables a build gives, and
    answers exactly as the flat index; saving it again writes the rank layout."""
    db = dataset("clustered", 2500, 64, seed=12)
    ids = np.random.default_rng(13).permutation(10**6)[:2500]
    path = tmp_path / "old.cmhidx"
    write_positions_layout(path, db, ids, 4, 4)
    loaded = load_index(path, mmap=mmap)
    fresh = MultiIndex(64, substrings=4)
    fresh.add(db, ids)
    fresh.build_tables()
    t, f = loaded._tables, fresh._tables
    for name in ("start", "width", "offsets", "perm", "ranks", "ordered"):
        assert np.array_equal(getattr(t, name), getattr(f, name)), name
    # The layout itself, against numpy: perm is table 0's bucket order, ordered the codes in
    # that order, and each other bucket lists the ranks of its codes in increasing order.
    _, _, offsets, positions = positions_tables(db, 4)
    n = len(db)
    assert np.array_equal(f.offsets, offsets) and np.array_equal(f.perm, positions[:n])
    assert np.array_equal(f.ordered, db[positions[:n]])
    rank_of = np.argsort(f.perm)
    for j in range(1, 4):
        off = offsets[j * (2**16 + 1) : (j + 1) * (2**16 + 1)]
        ranks, expect = f.ranks[(j - 1) * n : j * n], rank_of[positions[j * n : (j + 1) * n]]
        for b in np.flatnonzero(np.diff(off))[:200]:
            assert np.array_equal(ranks[off[b] : off[b + 1]], np.sort(expect[off[b] : off[b + 1]]))
    flat = HashIndex(64)
    flat.add(db, ids)
    q = np.concatenate([db[:20], dataset("clustered", 20, 64, seed=14)])
    for k in (1, 10, 50):
        assert same(flat.search(q, k), loaded.search(q, k))
    assert same(flat.range_search(q, 7), loaded.range_search(q, 7))
    loaded.add(db[:3] ^ 1)  # scanned next to the tables
    flat.add(db[:3] ^ 1)
    assert same(flat.search(q, 10), loaded.search(q, 10))
    loaded.save(tmp_path / "new.cmhidx")
    new = (tmp_path / "new.cmhidx").read_bytes()
    assert _section(new, b"MIHR") is not None and _section(new, b"MIHI") is None
    assert same(flat.search(q, 10), load_index(tmp_path / "new.cmhidx", mmap=mmap).search(q, 10))


def test_table_bytes_count_the_copy_of_the_codes(tables_always):
    db = dataset("clustered", 3000, 128, seed=15)
    multi = MultiIndex(128, substrings=8)
    multi.add(db)
    multi.build_tables()
    offsets = 8 * (2**16 + 1) * 4
    expect = offsets + 4 * 3000 + 4 * 7 * 3000 + 16 * 3000  # offsets, perm, ranks, ordered
    assert multi.table_bytes == expect and multi.explain(db[:2], k=3)["table_bytes"] == expect


def test_bad_arguments_are_typed():
    with pytest.raises(InvalidArgumentError, match="at most 1536"):
        MultiIndex(2048)
    with pytest.raises(InvalidArgumentError, match="within 3..64"):
        MultiIndex(64, substrings=2)
    with pytest.raises(ArgumentTypeError):
        MultiIndex(64, substrings=2.5)
    index = MultiIndex(64)
    index.add(dataset("random", 10, 64))
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        index.explain(index.codes, k=1, radius=2)
    with pytest.raises(InvalidArgumentError):
        index.search(index.codes, 0)


def test_native_tables_never_read_out_of_bounds():
    """Hostile tables (any int32 contents of the right sizes) give some answer, never a crash;
    buffers of the wrong size or dtype are refused."""
    rng = np.random.default_rng(11)
    db = rng.integers(0, 256, (200, 4), dtype=np.uint8)
    start, width = np.array([0, 16], np.int32), np.array([16, 16], np.int32)
    offsets = np.empty(2 * (2**16 + 1), np.int32)
    perm, ranks, ordered = np.empty(200, np.int32), np.empty(200, np.int32), np.empty_like(db)
    _hamming.mih_build(db, start, width, offsets, perm, ranks, ordered)
    assert np.array_equal(ordered, db[perm]) and np.array_equal(np.sort(perm), np.arange(200))
    D = np.empty((3, 5), np.int32)
    I = np.empty((3, 5), np.int64)
    st = np.empty((3, 3), np.int64)
    for trial in range(20):
        tabs = [offsets.copy(), perm.copy(), ranks.copy()]
        for arr in tabs:
            arr[rng.integers(0, arr.size, 50)] = rng.integers(-2**31, 2**31 - 1, 50, dtype=np.int64)
        _hamming.mih_knn(db[:3], db, start, width, *tabs, ordered, 200, 5, 10**6, D, I, st, 1)
        assert ((I >= -1) & (I < 200)).all()
        lims, d, i, s = _hamming.mih_range(db[:3], db, start, width, *tabs, ordered, 200, 8, 10**6, 1)
        assert ((np.frombuffer(i, np.int64) >= 0) & (np.frombuffer(i, np.int64) < 200)).all()
    tables = (offsets, perm, ranks, ordered)
    for at, bad in ((0, offsets[:-1]), (1, perm[:-1]), (2, ranks[:-1]), (3, ordered[:-1])):
        args = list(tables)
        args[at] = bad
        with pytest.raises(ValueError, match="tables must hold"):
            _hamming.mih_knn(db[:3], db, start, width, *args, 200, 5, 10, D, I, st)
        with pytest.raises(ValueError, match="tables must hold"):
            _hamming.mih_range(db[:3], db, start, width, *args, 200, 5, 10)
    for at, bad in ((1, perm.astype(np.int64)), (2, ranks.astype(np.uint32)), (3, ordered.astype(np.int8)),
                    (3, ordered.view(np.int32)), (0, offsets[::2])):
        args = list(tables)
        args[at] = bad
        with pytest.raises(TypeError):
            _hamming.mih_knn(db[:3], db, start, width, *args, 200, 5, 10, D, I, st)
    with pytest.raises(TypeError, match="writable"):
        _hamming.mih_build(db, start, width, offsets, perm, ranks, np.frombuffer(db.tobytes(), np.uint8))
    with pytest.raises(ValueError, match="tables must hold"):
        _hamming.mih_build(db, start, width, offsets, perm, ranks, ordered[:-1])
    shared = np.empty(offsets.size + 199, np.int32)  # outputs that overlap are refused
    with pytest.raises(ValueError, match="offsets and perm share memory"):
        _hamming.mih_build(db, start, width, shared[: offsets.size], shared[-200:], ranks, ordered)
    with pytest.raises(ValueError, match="db and ordered share memory"):
        _hamming.mih_build(db, start, width, offsets, perm, ranks, db)
    with pytest.raises(ValueError, match="within the 32 bits"):
        _hamming.mih_build(db, start, np.array([16, 17], np.int32), *tables)
    with pytest.raises(ValueError, match="n_tab"):
        _hamming.mih_knn(db[:3], db, start, width, *tables, 201, 5, 10, D, I, st)
    with pytest.raises(TypeError, match="int32"):
        _hamming.mih_knn(db[:3], db, start.astype(np.int64), width, *tables, 200, 5, 10, D, I, st)
    # Tables of fewer codes than db (codes added since): shorter perm, ranks and copy.
    _hamming.mih_knn(db[:3], db, start, width, offsets, perm[:150], ranks[:150], ordered[:150], 150, 5, 10**6,
                     D, I, st, 1)
    assert ((I >= -1) & (I < 200)).all()


def test_cli_builds_and_searches_a_multi_index(tables_always, tmp_path, capsys):
    db = dataset("clustered", 500, 64)
    np.savez(tmp_path / "codes.npz", codes=db, ids=np.arange(500) * 3, names=np.asarray([f"n{i}" for i in range(500)]))
    np.save(tmp_path / "q.npy", db[:4])
    for kind in ("flat", "mih"):
        out = tmp_path / f"{kind}.cmhidx"
        assert main(["index", "build", str(tmp_path / "codes.npz"), "--out", str(out), "--kind", kind, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["kind"] == kind
        assert main(["search", str(out), str(tmp_path / "q.npy"), "-k", "3", "--json", "--explain"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert [row[0] for row in result["ids"]] == [0, 3, 6, 9]
        assert result["explain"]["path"] == ("tables" if kind == "mih" else "scan")
    assert main(["index", "build", str(tmp_path / "codes.npz"), "--out", str(tmp_path / "x"), "--substrings", "3"]) == 2
    assert "--kind mih" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "codes.npz"), "--out", str(tmp_path / "x"), "--kind", "mih",
                 "--substrings", "2"]) == 2
    assert "substrings must be within" in capsys.readouterr().err


def test_long_codes_in_a_small_collection_get_no_tables(tables_always, tmp_path):
    db = dataset("clustered", 300, 1024)
    multi, flat = MultiIndex(1024), HashIndex(1024)
    multi.add(db)
    flat.add(db)
    report = multi.explain(db[:3], k=4)
    assert report["path"] == "scan" and "no tables" in report["reason"] and multi.table_bytes == 0
    assert same(flat.search(db[:3], 4), multi.search(db[:3], 4))
    multi.save(tmp_path / "long.cmhidx")  # saved without tables, loads and scans
    loaded = load_index(tmp_path / "long.cmhidx", mmap=True)
    assert same(flat.search(db[:3], 4), loaded.search(db[:3], 4))
