"""Hostile and careless use of HashIndex and the search functions: each case ends in a
typed error that says what to do, never in a crash, a MemoryError or a wrong answer."""

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import cmhash
from cmhash import HashIndex, limits
from cmhash.errors import (ArgumentTypeError, CmhashError, IndexChangedError, IndexFileError, IndexFullError,
                           InvalidArgumentError, ResourceLimitError)

RNG = np.random.default_rng(7)


def _index(n=1000, bits=64):
    index = HashIndex(bits)
    index.add(RNG.integers(0, 256, (n, bits // 8), dtype=np.uint8))
    return index


@pytest.fixture
def saved(tmp_path):
    index = _index()
    path = tmp_path / "codes.cmhidx"
    index.save(path)
    return index, path


def test_overwritten_in_place_mapped_file_is_refused(saved):
    index, path = saved
    mapped = HashIndex.load(path, mmap=True)
    queries = index.codes[:3]
    mapped.search(queries, 5)
    with open(path, "r+b") as f:  # another writer, in place
        f.seek(100)
        f.write(b"\xff" * 64)
    with pytest.raises(IndexChangedError, match="load it again"):
        mapped.search(queries, 5)
    with pytest.raises(IndexChangedError):
        mapped.add(queries, ids=[10**6, 10**6 + 1, 10**6 + 2])
    with pytest.raises(IndexFileError, match="checksum"):  # and loading it again finds the damage
        HashIndex.load(path)


def test_truncated_mapped_file_is_an_error_not_sigbus(saved, tmp_path):
    _, path = saved
    script = f"""
import os, numpy as np
from cmhash import HashIndex
from cmhash.errors import IndexChangedError
index = HashIndex.load({str(path)!r}, mmap=True)
os.truncate({str(path)!r}, 100)
try:
    index.search(np.zeros((1, 8), np.uint8), 5)
except IndexChangedError:
    print("typed")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr  # a SIGBUS would give -7
    assert out.stdout.strip() == "typed"


def test_atomically_replaced_file_keeps_serving_the_old_one(saved):
    index, path = saved
    mapped = HashIndex.load(path, mmap=True)
    queries = index.codes[:4]
    before = mapped.search(queries, 3)
    _index(50).save(path)  # os.replace: the mapping keeps the old file
    after = mapped.search(queries, 3)
    assert (before[0] == after[0]).all() and (before[1] == after[1]).all()
    assert len(HashIndex.load(path)) == 50


def test_mapped_index_copies_on_first_add_and_releases_the_file(saved):
    index, path = saved
    mapped = HashIndex.load(path, mmap=True)
    mapped.add(index.codes[:1], ids=[5000])
    os.truncate(path, 10)  # no longer read: the arrays were copied
    assert mapped.search(index.codes[:1], 1)[1][0, 0] in (0, 5000)


def test_automatic_ids_near_int64_max():
    index = HashIndex(32)
    code = np.zeros((1, 4), np.uint8)
    index.add(code, ids=[2**63 - 1])
    with pytest.raises(IndexFullError, match="explicit ids"):
        index.add(code)
    assert isinstance(IndexFullError("x"), CmhashError)
    index.add(code, ids=[7])  # explicit ids still work
    assert len(index) == 2


def test_file_with_exhausted_next_id_loads_and_refuses_automatic_ids(tmp_path):
    index = HashIndex(32)
    index.add(np.zeros((1, 4), np.uint8), ids=[2**63 - 1])
    index.save(tmp_path / "full.cmhidx")
    loaded = HashIndex.load(tmp_path / "full.cmhidx")
    with pytest.raises(IndexFullError):
        loaded.add(np.zeros((1, 4), np.uint8))


@pytest.mark.parametrize("call, error", [
    (lambda i, q: i.search(q, 0), InvalidArgumentError),
    (lambda i, q: i.search(q, 1.5), ArgumentTypeError),
    (lambda i, q: i.range_search(q, -1), InvalidArgumentError),
    (lambda i, q: i.search(q, 3, threads=0), InvalidArgumentError),
    (lambda i, q: i.add(q[:2], ids=[1, 1]), InvalidArgumentError),
    (lambda i, q: i.add(q[:1], ids=[-3]), InvalidArgumentError),
    (lambda i, q: i.add(q[:1], ids=[0]), InvalidArgumentError),
    (lambda i, q: i.add(q[:2], ids=[1.0, 2.0]), ArgumentTypeError),
    (lambda i, q: i.add(q[:2], ids=[10**6]), InvalidArgumentError),
])
def test_bad_arguments_are_typed(call, error):
    index = _index(10)
    with pytest.raises(error) as info:
        call(index, index.codes[:3].copy())
    assert isinstance(info.value, CmhashError)
    assert len(index) == 10  # nothing half-added


def test_huge_k_and_huge_distance_matrix_are_refused_before_allocation():
    index = _index(100)
    q = index.codes[:2].copy()
    with pytest.raises(ResourceLimitError, match="MAX_RESULT_BYTES"):
        index.search(q, 2**40)
    with pytest.raises(ResourceLimitError):
        cmhash.knn_search(q, index.codes, 10**12)
    big = np.zeros((200_000, 8), np.uint8)
    with pytest.raises(ResourceLimitError, match="GiB"):
        cmhash.hamming_distances(big, big)


def test_result_limit_can_be_raised(monkeypatch):
    index = _index(10)
    monkeypatch.setattr(limits, "MAX_RESULT_BYTES", 100)
    with pytest.raises(ResourceLimitError):
        index.search(index.codes[:1], 10)
    monkeypatch.setattr(limits, "MAX_RESULT_BYTES", 1000)
    assert index.search(index.codes[:1], 10)[0].shape == (1, 10)


def test_directory_is_not_an_index(tmp_path):
    with pytest.raises(IndexFileError, match="directory"):
        HashIndex.load(tmp_path)


def test_id_bookkeeping_costs_about_8_bytes_per_id():
    n = 1_000_000
    codes = np.zeros((n, 8), np.uint8)
    index = HashIndex(64)
    index.add(codes)
    index.add(codes[:1])  # grows the storage now, outside the measurement
    tracemalloc.start()
    index.add(codes[:1000], ids=np.arange(10**7, 10**7 + 1000))  # builds the id set, checks clashes
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # One sorted int64 array: 8 bytes per id. A Python set of ints would take 60+.
    assert peak < 12 * n, f"{peak / n:.1f} bytes per id"
    with pytest.raises(InvalidArgumentError, match="already in the index"):
        index.add(codes[:2], ids=[10**7 + 5, 3])
    assert index.remove([10**7 + 5, 3]) == 2
    index.add(codes[:2], ids=[10**7 + 5, 3])
    assert len(index) == n + 1001


def test_id_set_agrees_with_a_python_set_through_merges(monkeypatch):
    from cmhash.index import _IdSet
    monkeypatch.setattr(_IdSet, "TAIL", 4)  # merge often
    rng = np.random.default_rng(3)
    index, reference = HashIndex(8), set()
    for _ in range(300):
        if rng.random() < 0.7:
            ids = rng.choice(200, size=int(rng.integers(1, 6)), replace=False)
            clash = reference & set(ids.tolist())
            if clash:
                with pytest.raises(InvalidArgumentError):
                    index.add(np.zeros((ids.size, 1), np.uint8), ids=ids)
            else:
                index.add(np.zeros((ids.size, 1), np.uint8), ids=ids)
                reference |= set(ids.tolist())
        else:
            gone = rng.choice(200, size=3)
            assert index.remove(gone) == len(reference & set(gone.tolist()))
            reference -= set(gone.tolist())
        assert sorted(index.ids.tolist()) == sorted(reference)

