"""The native functions check every output buffer's dtype exactly (kind, size and byte
order), not only its byte size: a float32 buffer the size of int32 distances is refused
rather than filled with integer bit patterns."""

import numpy as np
import pytest

from cmhash import _hamming as h

RNG = np.random.default_rng(0)
Q = RNG.integers(0, 256, (4, 8), dtype=np.uint8)
DB = RNG.integers(0, 256, (10, 8), dtype=np.uint8)
LABELS_Q = RNG.integers(0, 2, (4, 1), dtype=np.uint8)
LABELS_DB = RNG.integers(0, 2, (10, 1), dtype=np.uint8)
BINS = 8 * 8 + 1

# same byte size as the right dtype, wrong dtype
SAME_SIZE_AS = {
    np.int32: [np.float32, np.uint32, ">i4", np.dtype("V4")],
    np.int64: [np.float64, np.uint64, ">i8", "datetime64[s]", np.complex64],
    np.float64: [np.int64, np.uint64, ">f8", np.complex64],
}


def distances(out):
    h.distances(Q, DB, out)


def knn_distances(out):
    h.knn(Q, DB, 3, out, np.empty(12, np.int64))


def knn_labels(out):
    h.knn(Q, DB, 3, np.empty(12, np.int32), out)


def rank(slot):
    def call(out):
        args = [np.zeros((4, BINS), np.int64), np.zeros((4, BINS), np.int64), np.zeros((4, 1)), np.zeros((4, 1))]
        args[slot] = out
        h.rank_metrics(Q, DB, LABELS_Q, LABELS_DB, [10], [5], *args)
    return call


ENTRY_POINTS = [
    ("distances out", distances, np.int32, 40),
    ("knn out_distances", knn_distances, np.int32, 12),
    ("knn out_labels", knn_labels, np.int64, 12),
    ("rank_metrics hist_all", rank(0), np.int64, 4 * BINS),
    ("rank_metrics hist_rel", rank(1), np.int64, 4 * BINS),
    ("rank_metrics ap", rank(2), np.float64, 4),
    ("rank_metrics prec", rank(3), np.float64, 4),
]


@pytest.mark.parametrize("name, call, dtype, count", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_wrong_dtype_of_the_same_size_is_refused(name, call, dtype, count):
    call(np.zeros(count, dtype))  # the right dtype works
    for wrong in SAME_SIZE_AS[dtype]:
        out = np.zeros(count, wrong)
        assert out.nbytes == count * np.dtype(dtype).itemsize
        with pytest.raises(TypeError, match=np.dtype(dtype).name):  # (datetime64 exports no buffer at all)
            call(out)
        assert not out.view(np.uint8).any(), f"{name}: {np.dtype(wrong)} buffer written before the refusal"
    with pytest.raises(TypeError, match=f"must be an array of {np.dtype(dtype).name}"):
        call(np.zeros(count * np.dtype(dtype).itemsize, np.uint8))  # bytes of the right total size
    with pytest.raises(TypeError, match="writable"):
        call(bytes(count * np.dtype(dtype).itemsize))
