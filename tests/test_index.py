"""HashIndex: ids, search against brute force, file format and its failure modes, atomic
saves under SIGKILL, and searches from several threads while others add and remove."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from cmhash.errors import CodeFormatError, IndexFileError
from cmhash.index import HashIndex

INT32_MAX = np.iinfo(np.int32).max
SDK = str(Path(__file__).resolve().parents[1] / "sdk")


def codes(n, nbytes=8, seed=0, values=256):
    return np.random.default_rng(seed).integers(0, values, (n, nbytes), dtype=np.uint8)


def ref_search(db, ids, q, k):
    """Brute force over (db, ids): k best by (distance, insertion order)."""
    R = np.unpackbits(q[:, None, :] ^ db[None, :, :], axis=2).sum(2, dtype=np.int32) if len(db) else np.zeros(
        (len(q), 0), np.int32)
    order = np.argsort(R, axis=1, kind="stable")[:, :k]
    D = np.full((len(q), k), INT32_MAX, np.int32)
    I = np.full((len(q), k), -1, np.int64)
    m = min(k, len(db))
    D[:, :m] = np.take_along_axis(R, order, 1)
    I[:, :m] = ids[order]
    return D, I, R


# -- ids and search -------------------------------------------------------------------

def test_add_search_remove_against_reference():
    index = HashIndex(64)
    a, b = codes(3000, seed=1, values=4), codes(500, seed=2, values=4)  # many ties
    auto = index.add(a)
    assert auto.tolist() == list(range(3000))
    explicit = np.arange(10_000, 10_500) * 3
    assert index.add(b, ids=explicit).tolist() == explicit.tolist()
    assert len(index) == 3500 and index.bits == 64 and index.nbytes == 8
    db, ids = np.concatenate([a, b]), np.concatenate([auto, explicit])
    q = codes(7, seed=3, values=4)
    for k in (1, 10, 3500, 3600):
        D, I = index.search(q, k)
        eD, eI, _ = ref_search(db, ids, q, k)
        assert np.array_equal(D, eD) and np.array_equal(I, eI), k

    gone = np.concatenate([auto[::3], explicit[:100], [-5, 99_999_999]])
    assert index.remove(gone) == 1000 + 100
    keep = ~np.isin(ids, gone)
    db, ids = db[keep], ids[keep]
    assert np.array_equal(index.ids, ids) and np.array_equal(index.codes, db)
    D, I = index.search(q, 25)
    eD, eI, R = ref_search(db, ids, q, 25)
    assert np.array_equal(D, eD) and np.array_equal(I, eI)

    lims, D, I = index.range_search(q, 20)
    for i in range(len(q)):
        order = np.argsort(R[i], kind="stable")
        hit = order[R[i][order] <= 20]
        assert np.array_equal(I[lims[i] : lims[i + 1]], ids[hit])
        assert np.array_equal(D[lims[i] : lims[i + 1]], R[i][hit])

    # Automatic ids continue past every id ever used; removed ids are not reused.
    nxt = index.add(codes(2, seed=4))
    assert nxt.tolist() == [int(explicit.max()) + 1, int(explicit.max()) + 2]
    assert index.remove([]) == 0


def test_ids_must_be_unique_and_valid():
    index = HashIndex(16)
    index.add(codes(3, 2), ids=[5, 6, 7])
    with pytest.raises(ValueError, match="already in the index, e.g. 6"):
        index.add(codes(2, 2), ids=[6, 100])
    with pytest.raises(ValueError, match="duplicate ids in the batch"):
        index.add(codes(2, 2), ids=[100, 100])
    with pytest.raises(ValueError, match=">= 0"):
        index.add(codes(1, 2), ids=[-1])
    with pytest.raises(ValueError, match="2 ids for 3 codes"):
        index.add(codes(3, 2), ids=[1, 2])
    with pytest.raises(TypeError, match="integers"):
        index.add(codes(1, 2), ids=[1.5])
    assert len(index) == 3  # failed adds add nothing
    assert index.remove([6]) == 1
    index.add(codes(1, 2), ids=[6])  # a removed id may be given again explicitly
    assert sorted(index.ids.tolist()) == [5, 6, 7]
    one = index.add(codes(1, 2)[0])  # a 1-D array is one code
    assert one.tolist() == [8] and len(index) == 4


def test_format_errors_and_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 8"):
        HashIndex(12)
    with pytest.raises(ValueError, match="multiple of 8"):
        HashIndex(0)
    with pytest.raises(TypeError):
        HashIndex(64.0)
    index = HashIndex(64)
    with pytest.raises(CodeFormatError, match="128-bit codes.*64-bit codes are expected"):
        index.add(codes(2, 16))
    index.add(codes(10))
    with pytest.raises(CodeFormatError, match="queries are 32-bit codes.*64-bit"):
        index.search(codes(2, 4), 3)
    with pytest.raises(CodeFormatError, match="dtype"):
        index.search(codes(2).astype(np.int64), 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(codes(2), 0)
    with pytest.raises(ValueError, match="radius must be >= 0"):
        index.range_search(codes(2), -1)
    ro = index.codes
    with pytest.raises(ValueError):
        ro[0, 0] = 1  # views are read-only


def test_empty_index_returns_padding():
    index = HashIndex(32)
    D, I = index.search(codes(3, 4), 5)
    assert (D == INT32_MAX).all() and (I == -1).all() and D.shape == (3, 5)
    lims, D, I = index.range_search(codes(3, 4), 32)
    assert lims.tolist() == [0, 0, 0, 0] and D.size == 0 and I.size == 0
    index.add(codes(2, 4))
    index.remove(index.ids)
    D, I = index.search(codes(1, 4), 2)
    assert (I == -1).all()


# -- files ----------------------------------------------------------------------------

def make_index(n=1000, bits=72, seed=0):
    index = HashIndex(bits)
    index.add(codes(n, bits // 8, seed), ids=np.arange(n) * 7 + 3)
    return index


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("n", [0, 1, 1000])
def test_save_load_round_trip(tmp_path, mmap, n):
    index = make_index(n)
    path = tmp_path / "a.cmh"
    index.save(path)
    assert os.listdir(tmp_path) == ["a.cmh"]  # no temporary left behind
    assert (path.stat().st_size - 64) % 8 == 0
    loaded = HashIndex.load(path, mmap=mmap)
    assert loaded.bits == 72 and len(loaded) == n
    assert np.array_equal(loaded.codes, index.codes) and np.array_equal(loaded.ids, index.ids)
    q = codes(5, 9, seed=9)
    for a, b in zip(loaded.search(q, 10), index.search(q, 10)):
        assert np.array_equal(a, b)
    # Adding copies a mapped index into memory; the file stays as it was.
    before = path.read_bytes()
    new = loaded.add(codes(3, 9, seed=11))
    assert new.tolist() == [index.ids.max() + 1 + i for i in range(3)] if n else new.tolist() == [0, 1, 2]
    assert len(loaded) == n + 3 and path.read_bytes() == before
    assert loaded.remove(new) == 3
    assert np.array_equal(loaded.codes, index.codes)


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "a.cmh"
    make_index(10).save(path)
    make_index(20, seed=1).save(path)
    assert len(HashIndex.load(path)) == 20


def _rewrite_header(data: bytes, fmt: str, offset: int, value) -> bytes:
    """Set a header field and recompute the header CRC, so only the field is wrong."""
    head = bytearray(data[:64])
    struct.pack_into(fmt, head, offset, value)
    struct.pack_into("<I", head, 60, zlib.crc32(bytes(head[:60])))
    return bytes(head) + data[64:]


def test_bad_files_raise_index_file_error(tmp_path):
    good = tmp_path / "good.cmh"
    make_index(500).save(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.cmh"

    def load(blob, mmap=False):
        bad.write_bytes(blob)
        return HashIndex.load(bad, mmap=mmap)

    cases = {
        "truncated": [data[:0], data[:5], data[:40], data[:64], data[:1000], data[:-1]],
        "header checksum": [data[:16] + bytes([data[16] ^ 1]) + data[17:], data[:30] + b"\xff" + data[31:]],
        "payload checksum": [data[:100] + bytes([data[100] ^ 0x10]) + data[101:], data[:-3] + b"\x00\x00\x01"],
        "not a cmhash index": [np.random.default_rng(0).bytes(4096), b"\x89PNG\r\n\x1a\n" + bytes(600)],
        "version 2.1 is not supported.*versions 1.x": [_rewrite_header(data, "<H", 8, 2)],
        "bad header values.*bits=12": [_rewrite_header(data, "<I", 16, 12)],
        "truncated file.*announces": [_rewrite_header(_rewrite_header(data, "<Q", 24, 10**6), "<Q", 40,
                                                                      10**6 * 9 + 10**6 * 8)],
        "payload length": [_rewrite_header(data, "<Q", 24, 501)],
        "unexpected bytes": [data + b"\x00"],
    }
    for pattern, blobs in cases.items():
        for blob in blobs:
            for mmap in (False, True):
                with pytest.raises(IndexFileError, match=pattern):
                    load(blob, mmap)
    with pytest.raises(IndexFileError, match="HashIndex.save"):  # says what to do
        load(data[:1000])
    assert len(load(data)) == 500  # and the untouched bytes still load


SAVER = r"""
import sys
import numpy as np
from cmhash.index import HashIndex
index = HashIndex(64)
index.add(np.random.default_rng(1).integers(0, 256, (2_000_000, 8), dtype=np.uint8))
print("begun", flush=True)
while True:
    index.save(sys.argv[1])
"""


def test_save_killed_midway_leaves_old_file_intact(tmp_path):
    """SIGKILL a process in the middle of saving a large index over an existing file: the
    file is either the old index or the complete new one, never a torn mix."""
    path = tmp_path / "index.cmh"
    old = make_index(300)
    old.save(path)
    old_bytes = path.read_bytes()
    env = dict(os.environ, PYTHONPATH=SDK)
    interrupted = 0
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout.readline().strip() == b"begun"
            deadline, temps = time.monotonic() + 20, []
            while not temps and time.monotonic() < deadline:  # wait until a save is under way
                temps = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
            time.sleep(0.003 * attempt)  # then kill at a slightly different moment each try
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        interrupted += bool(temps)
        data = path.read_bytes()
        if data != old_bytes:  # a save completed before the kill: it must be whole
            loaded = HashIndex.load(path)
            assert len(loaded) == 2_000_000
        else:
            loaded = HashIndex.load(path)
            assert np.array_equal(loaded.codes, old.codes) and np.array_equal(loaded.ids, old.ids)
        for p in os.listdir(tmp_path):  # what a killed save leaves: only its temporary
            if p.endswith(".tmp"):
                os.unlink(tmp_path / p)
        if interrupted:
            break
    assert interrupted, "the saver was never caught mid-save; the test proved nothing"


# -- threads --------------------------------------------------------------------------

def test_concurrent_searches_with_adds_and_removes():
    """Searches from several threads, while another thread adds and removes codes that are
    too far away to enter any result: every result must equal the single-thread one."""
    rng = np.random.default_rng(3)
    base = np.zeros((20_000, 8), np.uint8)
    base[:, :4] = rng.integers(0, 256, (20_000, 4))  # upper half zero
    far = np.zeros((50, 8), np.uint8)
    far[:, 4:] = 0xFF  # >= 32 bits from every query and base code, so never in a result
    queries = np.zeros((64, 8), np.uint8)
    queries[:, :4] = rng.integers(0, 256, (64, 4))
    index = HashIndex(64)
    index.add(base)
    expected = [index.search(queries[i::4], 10) for i in range(4)]
    expected_range = index.range_search(queries, 8)
    assert expected[0][0].max() < 32

    errors = []
    stop = threading.Event()

    def searcher(i):
        try:
            for _ in range(30):
                D, I = index.search(queries[i::4], 10, threads=1 + i % 2)
                assert np.array_equal(D, expected[i][0]) and np.array_equal(I, expected[i][1])
                lims, D, I = index.range_search(queries, 8, threads=1)
                for g, e in zip((lims, D, I), expected_range):
                    assert np.array_equal(g, e)
        except BaseException as exc:  # reported below; an assert in a thread is otherwise lost
            errors.append(exc)

    def mutator():
        rounds = 0
        while not stop.is_set() or rounds < 5:
            added = index.add(far)
            assert index.remove(added) == len(far)
            rounds += 1

    workers = [threading.Thread(target=searcher, args=(i,)) for i in range(4)]
    writer = threading.Thread(target=mutator)
    writer.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    writer.join()
    assert not errors, errors[0]
    assert len(index) == 20_000
    # And with no writer at all.
    workers = [threading.Thread(target=searcher, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors[0]
