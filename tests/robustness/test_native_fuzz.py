"""Fuzzing of every entry point of the C extension: random shapes, dtypes, layouts, bytes and
scalars. Each call either succeeds, with the result numpy computes, or raises TypeError,
ValueError or OverflowError; it never crashes, hangs or writes out of bounds (run under
tools/asan.sh to have the sanitizers watch)."""

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from cmhash import _hamming as h  # noqa: E402

REFUSED = (TypeError, ValueError, OverflowError)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
DTYPES = st.sampled_from([np.uint8, np.int8, np.int32, np.int64, np.float32, np.float64, np.bool_, ">i4", "<u2"])


@st.composite
def arrays(draw, rows=st.integers(0, 6), cols=st.integers(0, 10), valid=0.6):
    """Mostly valid packed codes (uint8, 2-D, C-contiguous); otherwise anything nearby."""
    n, m = draw(rows), draw(cols)
    data = np.frombuffer(draw(st.binary(min_size=n * m, max_size=n * m)), np.uint8).reshape(n, m).copy()
    if draw(st.floats(0, 1)) < valid:
        return data
    kind = draw(st.sampled_from(["dtype", "ndim", "strided", "fortran", "readonly", "object"]))
    if kind == "dtype":
        return data.astype(draw(DTYPES))
    if kind == "ndim":
        return data.reshape(-1) if draw(st.booleans()) else data[None]
    if kind == "strided":
        return np.repeat(data, 2, axis=1)[:, ::2]
    if kind == "fortran":
        return np.asfortranarray(np.repeat(data, 2, axis=0))
    if kind == "readonly":
        data.flags.writeable = False
        return data
    return draw(st.sampled_from([None, 3, "codes", b"\x00" * 8, [[1, 2]], bytearray(8)]))


def out_buffer(draw, count, dtype):
    """An output buffer: mostly right, sometimes of another size, dtype or kind."""
    if draw(st.floats(0, 1)) < 0.7:
        return np.zeros(count, dtype)
    kind = draw(st.sampled_from(["size", "dtype", "readonly", "bytes"]))
    if kind == "size":
        return np.zeros(max(0, count + draw(st.integers(-2, 2))), dtype)
    if kind == "dtype":
        return np.zeros(count, draw(DTYPES))
    if kind == "readonly":
        out = np.zeros(count, dtype)
        out.flags.writeable = False
        return out
    return bytes(count * np.dtype(dtype).itemsize)


def pair(data):
    """Two code arrays, usually of the same code length."""
    cols = data.draw(st.integers(0, 10))
    same = st.one_of(st.just(cols), st.just(cols), st.just(cols), st.integers(0, 10))
    return data.draw(arrays(cols=same)), data.draw(arrays(cols=same))


def threads():
    return st.one_of(st.integers(-2, 4), st.sampled_from([2**62, -(2**70)]))


def reference(q, db):
    return np.unpackbits(q[:, None, :] ^ db[None, :, :], axis=2).sum(axis=2).astype(np.int32)


def valid_pair(q, db):
    return (all(isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.flags.c_contiguous
                for x in (q, db)) and q.shape[1] == db.shape[1] and q.shape[1] > 0)


@SETTINGS
@given(st.data())
def test_distances(data):
    q, db = pair(data)
    count = (len(q) * len(db)) if all(isinstance(x, np.ndarray) for x in (q, db)) else 1
    out = out_buffer(data.draw, count, np.int32)
    t = data.draw(threads())
    try:
        h.distances(q, db, out, t)
    except REFUSED:
        return
    assert valid_pair(q, db)
    assert np.array_equal(out.reshape(len(q), len(db)), reference(q, db))


@SETTINGS
@given(st.data())
def test_knn(data):
    q, db = pair(data)
    k = data.draw(st.one_of(st.integers(1, 8), st.integers(1, 8), st.integers(-1, 0),
                            st.sampled_from([2**40, 2**63 - 1, 2**64])))
    nq = len(q) if isinstance(q, np.ndarray) else 1
    count = nq * k if 0 < k < 100 else 1
    dist, labels = out_buffer(data.draw, count, np.int32), out_buffer(data.draw, count, np.int64)
    try:
        h.knn(q, db, k, dist, labels, data.draw(threads()))
    except REFUSED:
        return
    assert valid_pair(q, db) and k >= 1
    full = reference(q, db)
    dist, labels = dist.reshape(nq, k), labels.reshape(nq, k)
    for i in range(nq):
        found = labels[i][labels[i] >= 0]
        assert len(found) == min(k, len(db)) and np.array_equal(dist[i][: len(found)], full[i, found])
        assert np.array_equal(np.sort(dist[i][: len(found)]), np.sort(full[i])[: len(found)])


@SETTINGS
@given(st.data())
def test_range_search(data):
    q, db = pair(data)
    radius = data.draw(st.one_of(st.integers(-1, 80), st.sampled_from([2**31, 2**63, -(2**63)])))
    try:
        lims, dist, labels = h.range_search(q, db, radius, data.draw(threads()))
    except REFUSED:
        return
    assert valid_pair(q, db) and radius >= 0
    lims, dist, labels = (np.frombuffer(lims, np.int64), np.frombuffer(dist, np.int32),
                          np.frombuffer(labels, np.int64))
    full = reference(q, db)
    for i in range(len(q)):
        hit = labels[lims[i]: lims[i + 1]]
        assert sorted(hit) == list(np.flatnonzero(full[i] <= radius))
        assert np.array_equal(dist[lims[i]: lims[i + 1]], full[i, hit])


@SETTINGS
@given(st.data())
def test_rank_metrics(data):
    cols = data.draw(st.integers(0, 10))
    q = data.draw(arrays(rows=st.integers(1, 4), cols=st.just(cols)))
    db = data.draw(arrays(rows=st.integers(1, 6), cols=st.one_of(st.just(cols), st.integers(0, 10))))
    ql, dbl = data.draw(arrays(rows=st.just(len(q) if isinstance(q, np.ndarray) else 1), cols=st.just(1))), \
        data.draw(arrays(rows=st.just(len(db) if isinstance(db, np.ndarray) else 1), cols=st.sampled_from([1, 1, 0, 2])))
    ks = st.lists(st.one_of(st.integers(1, 8), st.integers(1, 8), st.integers(-1, 0), st.just(2**64)), max_size=3)
    map_ks, prec_ks = data.draw(ks), data.draw(ks)
    if data.draw(st.integers(0, 9)) == 0:
        map_ks = data.draw(st.sampled_from([None, "ks", [1.5], (3,)]))
    nq = len(q) if isinstance(q, np.ndarray) else 1
    bins = 8 * (q.shape[1] if isinstance(q, np.ndarray) and q.ndim == 2 else 1) + 1
    n_map = len(map_ks) if isinstance(map_ks, (list, tuple)) else 1
    n_prec = len(prec_ks)
    outs = [out_buffer(data.draw, nq * bins, np.int64), out_buffer(data.draw, nq * bins, np.int64),
            out_buffer(data.draw, nq * n_map, np.float64), out_buffer(data.draw, nq * n_prec, np.float64)]
    try:
        h.rank_metrics(q, db, ql, dbl, map_ks, prec_ks, *outs, data.draw(threads()))
    except REFUSED:
        return
    assert valid_pair(q, db)
    hist_all = outs[0].reshape(nq, bins)
    assert np.array_equal(hist_all.sum(axis=1), np.full(nq, len(db)))
    assert np.all((outs[2] >= 0) & (outs[2] <= 1)) and np.all((outs[3] >= 0) & (outs[3] <= 1))


@SETTINGS
@given(st.one_of(st.text(max_size=12), st.none(), st.integers(), st.binary(max_size=8)))
def test_simd_level_controls(name):
    before = h.get_simd_level()
    try:
        h.set_simd_level(name)
    except REFUSED:
        assert h.get_simd_level() == before
    else:
        assert name in h.simd_levels() and h.get_simd_level() == name
    finally:
        h.set_simd_level(before)
    assert h.sysinfo()["simd_level"] == before
