"""Native exact search (cmhash._hamming: distances, knn, range_search) and its numpy
wrappers, checked against brute force in numpy at every SIMD level the CPU has."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import cmhash._hamming as h
from cmhash.errors import CodeFormatError
from cmhash.search import hamming_distances, knn_search, range_search

INT32_MAX = np.iinfo(np.int32).max
LEVELS = h.simd_levels()
# 8, 16, 24, 32, 40, 64, 72, 128, 136, 256, 512, 1024 bits, plus odd byte counts.
CODE_BYTES = [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 64, 128, 7, 33, 100]


@pytest.fixture(params=LEVELS)
def level(request):
    before = h.get_simd_level()
    h.set_simd_level(request.param)
    yield request.param
    h.set_simd_level(before)


def ref_distances(q, db):
    """Brute force: unpack q XOR db and count the bits."""
    if q.shape[0] == 0 or db.shape[0] == 0:
        return np.zeros((q.shape[0], db.shape[0]), dtype=np.int32)
    return np.unpackbits(q[:, None, :] ^ db[None, :, :], axis=2).sum(2, dtype=np.int32)


def ref_knn(R, k):
    """k best per row by (distance, position), padded as FAISS pads."""
    nq, n = R.shape
    order = np.argsort(R, axis=1, kind="stable")[:, :k]  # stable: ties by position
    D = np.full((nq, k), INT32_MAX, dtype=np.int32)
    I = np.full((nq, k), -1, dtype=np.int64)
    m = min(k, n)
    I[:, :m] = order
    D[:, :m] = np.take_along_axis(R, order, 1)
    return D, I


def ref_range(R, radius):
    lims, D, I = [0], [], []
    for row in R:
        order = np.argsort(row, kind="stable")
        hit = order[row[order] <= radius]
        D.append(row[hit])
        I.append(hit)
        lims.append(lims[-1] + hit.size)
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)
    return np.array(lims, dtype=np.int64), cat(D, np.int32), cat(I, np.int64)


def block_of(nbytes):  # mirrors block_codes() in search.c: sizes that span several blocks
    return min(max(16 * 1024 // nbytes, 128), 8192)


def make_data(rng, nq, n, nbytes, ties):
    q = rng.integers(0, 256, (nq, nbytes), dtype=np.uint8)
    if ties:  # few distinct codes: long runs of equal distances
        pool = rng.integers(0, 256, (4, nbytes), dtype=np.uint8)
        db = pool[rng.integers(0, 4, n)]
    else:
        db = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    return q, np.ascontiguousarray(db)


@pytest.mark.parametrize("nbytes", CODE_BYTES)
def test_knn_distances_range_match_reference(level, nbytes):
    rng = np.random.default_rng(nbytes)
    big = 2 * block_of(nbytes) + 123  # several blocks, many compactions for small k
    for ties in (False, True):
        q, db = make_data(rng, 3, big, nbytes, ties)
        R_full = ref_distances(q, db)
        for n in (0, 1, 37, big):
            R = R_full[:, :n]
            sub = db[:n]
            for threads in (1, 2, 3):
                assert np.array_equal(hamming_distances(q, sub, threads=threads), R)
                for k in sorted({1, 5, max(n, 1), n + 3}):
                    D, I = knn_search(q, sub, k, threads=threads)
                    eD, eI = ref_knn(R, k)
                    assert np.array_equal(D, eD), (n, k, threads, ties)
                    assert np.array_equal(I, eI), (n, k, threads, ties)
            for radius in (0, nbytes * 3, nbytes * 4, nbytes * 8):
                got = range_search(q, sub, radius, threads=2)
                for g, e in zip(got, ref_range(R, radius)):
                    assert np.array_equal(g, e), (n, radius)


@pytest.mark.parametrize("nbytes", [4, 8, 16, 32, 64])
def test_every_remainder_of_the_vector_steps(level, nbytes):
    """The vector kernels take 7, 8 or 16 codes per step and the kNN scans test 32 or 64
    distances at once: database sizes 0 to 140 leave every remainder, for k below and
    above the size, with and without ties."""
    rng = np.random.default_rng(nbytes + 100)
    for ties in (False, True):
        q, db = make_data(rng, 2, 140, nbytes, ties)
        R_full = ref_distances(q, db)
        for n in range(141):
            R = R_full[:, :n]
            assert np.array_equal(hamming_distances(q, db[:n], threads=1), R), n
            for k in (1, 7, n + 2):
                D, I = knn_search(q, db[:n], k, threads=1)
                eD, eI = ref_knn(R, k)
                assert np.array_equal(D, eD) and np.array_equal(I, eI), (n, k, ties)


@pytest.mark.parametrize("nbytes", [4, 8, 16, 24, 32])
def test_many_queries_per_thread(level, nbytes):
    """Sixteen or more queries per thread take the planar kernels at avx2 (codes of 8 to 32
    bytes): sizes that leave remainders of their 64-code steps and span several of their
    blocks, with ties, and with codes at the full code length from a query (byte sums
    saturate there)."""
    rng = np.random.default_rng(nbytes + 200)
    for ties in (False, True):
        q, db = make_data(rng, 40, 2 * 1024 + 77, nbytes, ties)
        q[0] = 0
        db[::5] = 0xFF
        R_full = ref_distances(q, db)
        for n in (1, 63, 64, 65, 130, len(db)):
            R = R_full[:, :n]
            for threads in (1, 2):
                for k in (1, 10, n + 2):
                    D, I = knn_search(q, db[:n], k, threads=threads)
                    eD, eI = ref_knn(R, k)
                    assert np.array_equal(D, eD) and np.array_equal(I, eI), (n, k, threads, ties)


@pytest.mark.parametrize("nbytes", [1, 3, 8, 32])
@pytest.mark.parametrize("nq", [1, 2])
def test_few_queries_split_the_database(level, nbytes, nq):
    """Fewer queries than threads and a large database: each thread takes a database
    range and the per-thread results are merged by (distance, position)."""
    rng = np.random.default_rng(nbytes * 10 + nq)
    for ties in (False, True):
        q, db = make_data(rng, nq, 70_000, nbytes, ties)
        R = ref_distances(q, db)
        for threads in (2, 3, 4, 9):
            for k in (1, 10, 300):
                D, I = knn_search(q, db, k, threads=threads)
                eD, eI = ref_knn(R, k)
                assert np.array_equal(D, eD) and np.array_equal(I, eI), (threads, k, ties)
            assert np.array_equal(hamming_distances(q, db, threads=threads), R)
            got = range_search(q, db, nbytes * 3, threads=threads)
            for g, e in zip(got, ref_range(R, nbytes * 3)):
                assert np.array_equal(g, e)


def test_more_threads_than_items_and_no_queries():
    rng = np.random.default_rng(5)
    q, db = make_data(rng, 3, 2, 8, False)
    D, I = knn_search(q, db, 4, threads=16)
    eD, eI = ref_knn(ref_distances(q, db), 4)
    assert np.array_equal(D, eD) and np.array_equal(I, eI)
    D, I = knn_search(q[:0], db, 4)
    assert D.shape == (0, 4) and I.shape == (0, 4)
    lims, D, I = range_search(q[:0], db, 3)
    assert lims.tolist() == [0] and D.size == 0 and I.size == 0
    assert hamming_distances(q[:0], db).shape == (0, 2)
    lims, D, I = range_search(q, db[:0], 64)
    assert lims.tolist() == [0, 0, 0, 0]


def test_one_dimensional_query_is_one_code():
    rng = np.random.default_rng(6)
    q, db = make_data(rng, 1, 50, 8, False)
    D1, I1 = knn_search(q[0], db, 3)
    D2, I2 = knn_search(q, db, 3)
    assert D1.shape == (1, 3) and np.array_equal(D1, D2) and np.array_equal(I1, I2)


def test_range_search_is_inclusive_and_faiss_is_strict():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(7)
    q, db = make_data(rng, 4, 3000, 8, False)
    R = ref_distances(q, db)
    radius = 24
    lims, D, I = range_search(q, db, radius)
    assert (D <= radius).all() and (D == radius).any()
    index = faiss.IndexBinaryFlat(64)
    index.add(db)
    flims, fD, fI = index.range_search(q, radius + 1)  # FAISS: distance < radius
    assert np.array_equal(np.diff(flims), np.diff(lims))
    for i in range(4):
        assert set(fI[flims[i] : flims[i + 1]].tolist()) == set(I[lims[i] : lims[i + 1]].tolist())
    assert np.array_equal(np.diff(lims), (R <= radius).sum(1))


def test_knn_distances_agree_with_faiss():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(8)
    for nbytes in (8, 32):
        q, db = make_data(rng, 20, 20_000, nbytes, False)
        index = faiss.IndexBinaryFlat(nbytes * 8)
        index.add(db)
        fD, _ = index.search(q, 50)
        D, _ = knn_search(q, db, 50)
        assert np.array_equal(D, fD)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nbytes=st.integers(1, 40),
    n=st.integers(0, 400),
    nq=st.integers(0, 4),
    k=st.integers(1, 450),
    threads=st.integers(1, 4),
    values=st.sampled_from([2, 4, 256]),  # small value ranges make many ties
    seed=st.integers(0, 2**32 - 1),
    level=st.sampled_from(LEVELS),
)
def test_knn_property(nbytes, n, nq, k, threads, values, seed, level):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, values, (nq, nbytes), dtype=np.uint8)
    db = rng.integers(0, values, (n, nbytes), dtype=np.uint8)
    before = h.get_simd_level()
    h.set_simd_level(level)
    try:
        D, I = knn_search(q, db, k, threads=threads)
    finally:
        h.set_simd_level(before)
    eD, eI = ref_knn(ref_distances(q, db), k)
    assert np.array_equal(D, eD) and np.array_equal(I, eI)


# -- bad input ------------------------------------------------------------------------

def _codes(n=4, nbytes=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, nbytes), dtype=np.uint8)


def test_native_rejects_bad_buffers():
    q, db = _codes(), _codes(10)
    od, oi = np.empty(4 * 3, np.int32), np.empty(4 * 3, np.int64)
    with pytest.raises(TypeError, match="uint8"):
        h.knn(q.astype(np.int32), db, 3, od, oi)
    with pytest.raises(ValueError, match="2-D"):
        h.knn(q[None], db, 3, od, oi)
    with pytest.raises(TypeError, match="C-contiguous"):
        h.knn(np.asfortranarray(_codes(4, 8))[:, ::2], db, 3, od, oi)
    with pytest.raises(TypeError, match="C-contiguous"):
        h.distances(q, db[::2], np.empty((4, 5), np.int32))
    with pytest.raises(ValueError, match="8 bytes per code.*16 bytes|16 bytes.*8 bytes"):
        h.knn(q, _codes(10, 16), 3, od, oi)
    with pytest.raises(ValueError, match="k must be >= 1"):
        h.knn(q, db, 0, od, oi)
    with pytest.raises(ValueError, match="radius must be >= 0"):
        h.range_search(q, db, -1)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        h.knn(q, db, 3, od, oi, threads=-1)
    with pytest.raises(ValueError, match="out_distances must hold 12 items"):
        h.knn(q, db, 3, np.empty(11, np.int32), oi)
    with pytest.raises(ValueError, match="out_labels must hold 12 items"):
        h.knn(q, db, 3, od, np.empty(11, np.int64))
    with pytest.raises(TypeError, match="out_labels must be an array of int64"):
        h.knn(q, db, 3, od, np.empty(12, np.int32))
    with pytest.raises(ValueError, match="out must hold 40 items"):
        h.distances(q, db, np.empty(39, np.int32))
    with pytest.raises(TypeError, match="writable"):
        ro = np.empty(12, np.int32)
        ro.flags.writeable = False
        h.knn(q, db, 3, ro, oi)
    with pytest.raises(ValueError, match="1 to 8191 bytes"):
        h.knn(np.zeros((4, 0), np.uint8), np.zeros((10, 0), np.uint8), 3, od, oi)
    with pytest.raises(ValueError, match="do not fit"):
        h.knn(q, db, 2**62, od, oi)
    with pytest.raises(OverflowError):
        h.knn(q, db, 2**70, od, oi)


def test_wrappers_raise_typed_errors():
    q, db = _codes(), _codes(10)
    with pytest.raises(CodeFormatError, match="dtype float64"):
        knn_search(q.astype(float), db, 3)
    with pytest.raises(CodeFormatError, match="db are 128-bit codes.*64-bit codes are expected"):
        knn_search(q, _codes(10, 16), 3)
    with pytest.raises(CodeFormatError, match="2-D"):
        hamming_distances(q[None], db)
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_search(q, db, 0)
    with pytest.raises(ValueError, match="radius must be >= 0"):
        range_search(q, db, -1)
    with pytest.raises(ValueError, match="threads"):
        knn_search(q, db, 3, threads=0)
    with pytest.raises(TypeError, match="k must be an int"):
        knn_search(q, db, 2.5)
    # Non-contiguous uint8 is fine in the wrappers (copied, same values).
    wide = _codes(10, 16)
    D, I = knn_search(q, wide[:, ::2], 3)
    eD, eI = ref_knn(ref_distances(q, np.ascontiguousarray(wide[:, ::2])), 3)
    assert np.array_equal(D, eD) and np.array_equal(I, eI)
    # A radius beyond the code length finds everything.
    lims, D, I = range_search(q, db, 10**9)
    assert lims.tolist() == [0, 10, 20, 30, 40]


FUZZ = textwrap.dedent(
    r"""
    import random, sys
    import numpy as np
    import cmhash._hamming as h

    rng = random.Random(int(sys.argv[1]))
    nrng = np.random.default_rng(int(sys.argv[1]))
    OK = (TypeError, ValueError, OverflowError, MemoryError, BufferError)
    levels = h.simd_levels()

    def array():
        kind = rng.choice([0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7])
        nq = rng.choice([0, 1, 2, 3, 17, 70])
        nb = rng.choice([0, 1, 3, 8, 9, 32, 33])
        if kind == 0:
            return nrng.integers(0, 256, (nq, nb), dtype=np.uint8)
        if kind == 1:
            return nrng.integers(0, 256, (nq, nb)).astype(rng.choice(["i4", "f8", "i1", "u2", "?"]))
        if kind == 2:
            return nrng.integers(0, 256, rng.choice([(nq,), (nq, nb, 2), (), (2, 0, 3)]), dtype=np.uint8)
        if kind == 3:
            return nrng.integers(0, 256, (nq, nb * 2 + 1), dtype=np.uint8)[:, ::2]
        if kind == 4:
            return memoryview(bytes(nrng.integers(0, 256, 64, dtype=np.uint8))).cast(
                rng.choice(["B", "b", "i", "d", "c"]))
        if kind == 5:
            return memoryview(bytearray(64)).cast("B", (8, 8))
        if kind == 6:
            return np.empty((nq, rng.choice([0, 1, 5, 100])), dtype=rng.choice(["i4", "i8", "u1"]))
        return rng.choice([None, 0, -1, 2**63, "abc", b"\x00" * 16, bytearray(b"\x01" * 16),
                           3.5, object(), [1, 2], np.zeros(4, np.int64)])

    def number():
        if rng.random() < 0.7:
            return rng.choice([1, 2, 3, 7, 64, 500])
        return rng.choice([0, 2**31, 2**62, 2**63 - 1, -1, -2**63, 2**64, None, 1.5, "3"])

    def out(q, db, k, dtype):
        try:
            count = (q.shape[0] if hasattr(q, "shape") and q.ndim else 1) * int(k)
            if rng.random() < 0.3:
                count += rng.choice([-1, 1])
            count = min(max(count, 0), 10**6)
        except Exception:
            count = 3
        return np.empty(count, dtype=dtype) if rng.random() < 0.9 else array()

    ok = [0, 0, 0]
    for it in range(int(sys.argv[2])):
        h.set_simd_level(rng.choice(levels))
        q, db = array(), array()
        if rng.random() < 0.5 and isinstance(q, np.ndarray) and q.ndim == 2 and q.dtype == np.uint8:
            db = nrng.integers(0, rng.choice([2, 256]), (rng.choice([0, 1, 5, 300, 40000]), q.shape[1]), dtype=np.uint8)
        threads = rng.choice([0, 1, 2, 3, 0, 1, 2, 3, 1000, -1, 2**40])
        which = rng.randrange(3)
        try:
            if which == 0:
                k = number()
                od, oi = out(q, db, k, np.int32), out(q, db, k, np.int64)
                res = h.knn(q, db, k, od, oi, threads=threads)
                assert res is None
                rows = od.reshape(-1, k)
                assert (np.diff(rows.astype(np.int64), axis=1) >= 0).all()  # sorted rows
                assert ((rows <= q.shape[1] * 8) | (rows == 2**31 - 1)).all()
                assert ((oi >= -1) & (oi < max(db.shape[0], 1))).all()
            elif which == 1:
                n = db.shape[0] if hasattr(db, "shape") and db.ndim else 1
                res = h.distances(q, db, out(q, db, n, np.int32), threads)
                assert res is None
            else:
                lims, d, i = h.range_search(q, db, number(), threads=threads)
                assert isinstance(lims, bytearray) and len(d) // 4 == len(i) // 8
            ok[which] += 1
        except OK:
            pass
    print("fuzz done", *ok)
    """
)


@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_native_functions_never_crash(seed):
    """Random objects, shapes, dtypes and sizes at every native search function, in a
    subprocess so that a crash fails this test instead of killing pytest."""
    proc = subprocess.run([sys.executable, "-c", FUZZ, str(seed), "4000"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "fuzz done" in proc.stdout
    successes = [int(x) for x in proc.stdout.split("fuzz done")[1].split()]
    assert min(successes) >= 20, successes  # the fuzz must also reach the search itself
