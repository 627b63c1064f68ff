"""Rank metrics (cmhash.metrics, native rank_metrics) against slow, obviously correct
references: stable argsort rankings, brute force over every order of tied items, and a
re-implementation of the papers' calc_map_k on the real MIRFlickr-25K labels."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import cmhash
from cmhash import _hamming
from cmhash import metrics as M
from fixtures.data import DATA, require

MIRFLICKR = DATA / "mirflickr25k" / "labels_tags.npz"


# ------------------------------------------------------------------ references


def ref_rankings(qb, dbb, ql, dl):
    """Per query: (distance, relevance) in the order of a stable sort on distance."""
    for i in range(qb.shape[0]):
        dist = (qb[i] != dbb).sum(axis=1)
        rel = (ql[i].astype(np.int64) @ dl.T.astype(np.int64)) > 0
        order = np.argsort(dist, kind="stable")
        yield dist, rel, dist[order], rel[order]


def ref_ap(rel_sorted, k=None):
    """Textbook AP@k: mean of precision at relevant positions <= k; 0 when none."""
    pos = np.nonzero(rel_sorted)[0] + 1
    ranks = np.arange(1, pos.size + 1)
    if k is not None:
        keep = pos <= k
        pos, ranks = pos[keep], ranks[keep]
    return float(np.mean(ranks / pos)) if pos.size else 0.0


def calc_map_k_literature(qB, rB, query_label, retrieval_label, k=None):
    """The DCMH/DCHMT `calc_map_k`, faithfully in numpy with a stable sort: ±1 codes,
    Hamming = 0.5 (bits - qB.rB^T), k caps the number of relevant hits, queries without
    relevant items are skipped but the sum is divided by all queries."""
    num_query = query_label.shape[0]
    if k is None:
        k = retrieval_label.shape[0]
    m = 0.0
    for it in range(num_query):
        gnd = (query_label[it] @ retrieval_label.T > 0).astype(np.float32)
        tsum = np.sum(gnd)
        if tsum == 0:
            continue
        hamm = 0.5 * (qB.shape[1] - qB[it] @ rB.T)
        ind = np.argsort(hamm, kind="stable")
        gnd = gnd[ind]
        total = min(k, int(tsum))
        count = np.arange(1, total + 1).astype(np.float64)
        tindex = np.nonzero(gnd)[0][:total].astype(np.float64) + 1.0
        m += np.mean(count / tindex)
    return m / num_query


def brute_tie_aware_ap(dist, rel):
    """Expected AP over every ordering consistent with the distances (all of them equally
    likely): enumerate all permutations and keep the sorted ones."""
    n = len(dist)
    total, count = 0.0, 0
    for perm in itertools.permutations(range(n)):
        d = np.asarray(dist, dtype=np.int64)[list(perm)]
        if np.any(np.diff(d) < 0):
            continue
        total += ref_ap(rel[list(perm)])
        count += 1
    return total / count


def random_case(rng, nq, n, bits, classes, density=0.3):
    q = rng.integers(0, 256, (nq, bits // 8), dtype=np.uint8)
    db = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    # Make codes cluster so that ties and near ties are common.
    if n and nq:
        db[: n // 2] = q[rng.integers(0, nq, n // 2)] ^ (rng.random((n // 2, bits // 8)) < 0.05).astype(np.uint8)
    ql = (rng.random((nq, classes)) < density).astype(np.uint8)
    dl = (rng.random((n, classes)) < density).astype(np.uint8)
    return q, db, ql, dl


def unpack(codes):
    return np.unpackbits(codes, axis=1, bitorder="little")


@pytest.fixture
def each_simd_level():
    """Yields every SIMD level this CPU runs; restores the level in use afterwards."""
    before = _hamming.get_simd_level()
    try:
        yield _hamming.simd_levels()
    finally:
        _hamming.set_simd_level(before)


# ------------------------------------------------------------ against references


@pytest.mark.parametrize("bits", [8, 16, 24, 32, 64, 72, 128, 256, 520])
def test_all_metrics_match_references(bits, each_simd_level):
    rng = np.random.default_rng(bits)
    # 97 db items: not a multiple of any block or vector width; 7 classes -> 1 label byte,
    # 12 -> 2 bytes (the AVX-512 relevance test), 70 -> 9 bytes (padded to 16 inside).
    for classes in (7, 12, 70):
        q, db, ql, dl = random_case(rng, 13, 97, bits, classes, density=0.08 if classes == 70 else 0.3)
        map_k, prec_k = (None, 1, 10, 50, 500), (1, 5, 96, 97, 1000)
        expect_ap = np.zeros((13, len(map_k)))
        expect_p = np.zeros((13, len(prec_k)))
        expect_ha = np.zeros((13, bits + 1), np.int64)
        expect_hr = np.zeros((13, bits + 1), np.int64)
        for i, (dist, rel, _, rel_sorted) in enumerate(ref_rankings(unpack(q), unpack(db), ql, dl)):
            expect_ap[i] = [ref_ap(rel_sorted, k) for k in map_k]
            expect_p[i] = [rel_sorted[: min(k, 97)].mean() for k in prec_k]
            expect_ha[i] = np.bincount(dist, minlength=bits + 1)
            expect_hr[i] = np.bincount(dist[rel], minlength=bits + 1)
        for level in each_simd_level:
            _hamming.set_simd_level(level)
            for threads in (1, 2, 3):
                res = M.retrieval_metrics(q, db, ql, dl, map_k=map_k, precision_k=prec_k, threads=threads)
                np.testing.assert_array_equal(res["hist_all"], expect_ha, err_msg=f"{level} {threads}")
                np.testing.assert_array_equal(res["hist_rel"], expect_hr, err_msg=f"{level} {threads}")
                np.testing.assert_allclose(res["ap"], expect_ap, rtol=0, atol=1e-12)
                np.testing.assert_allclose(res["precision_per_query"], expect_p, rtol=0, atol=1e-12)
                assert res["map"][None] == pytest.approx(expect_ap[:, 0].mean(), abs=1e-12)


def test_larger_database_crosses_blocks_and_stripes():
    # More than 4 stripes x 1024-item blocks, with a ragged last block.
    rng = np.random.default_rng(7)
    q, db, ql, dl = random_case(rng, 6, 4 * 1024 * 2 + 37, 32, 5)
    map_k, prec_k = (None, 100, 3000), (10, 5000)
    res = M.retrieval_metrics(q, db, ql, dl, map_k=map_k, precision_k=prec_k, threads=2)
    for i, (_, _, _, rel_sorted) in enumerate(ref_rankings(unpack(q), unpack(db), ql, dl)):
        for j, k in enumerate(map_k):
            assert res["ap"][i, j] == pytest.approx(ref_ap(rel_sorted, k), abs=1e-12)
        for j, k in enumerate(prec_k):
            assert res["precision_per_query"][i, j] == pytest.approx(rel_sorted[:k].mean(), abs=1e-12)
    # AP@all alone takes the native fast path (partial sums, no cutoff tests)
    alone = M.retrieval_metrics(q, db, ql, dl, threads=2)
    np.testing.assert_allclose(alone["ap"][:, 0], res["ap"][:, 0], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_database_over_2_to_26_items_uses_several_stripe_groups():
    # Counter words hold per-stripe counts in 24 bits, so past 4 x (2^24 - 1) items the
    # database is cut into two groups of four stripes. 8-bit codes: distances 0..8, so
    # the reference ranking is a stable counting order computed per distance.
    n = 4 * (2**24 - 1) + 5
    rng = np.random.default_rng(11)
    db = rng.integers(0, 256, (n, 1), dtype=np.uint8)
    dl = rng.integers(0, 2, (n, 2), dtype=np.uint8)  # two classes; the query has the first
    q = np.array([[0b1011_0001]], np.uint8)
    ql = np.array([[1, 0]], np.uint8)
    res = M.retrieval_metrics(q, db, ql, dl, map_k=(None, 1000), precision_k=(n,), threads=1)
    alone = M.retrieval_metrics(q, db, ql, dl, threads=1)

    dist = np.unpackbits(db[:, 0] ^ q[0, 0]).reshape(n, 8).sum(axis=1, dtype=np.uint8)
    del db
    rel = dl[:, 0] == 1
    del dl
    rel_sorted = rel[np.argsort(dist, kind="stable")]
    np.testing.assert_array_equal(res["hist_all"][0], np.bincount(dist, minlength=9))
    np.testing.assert_array_equal(res["hist_rel"][0], np.bincount(dist[rel], minlength=9))
    del dist, rel
    expect = [ref_ap(rel_sorted), ref_ap(rel_sorted, 1000)]
    np.testing.assert_allclose(res["ap"][0], expect, rtol=0, atol=1e-9)
    assert alone["ap"][0, 0] == pytest.approx(expect[0], abs=1e-9)
    assert res["precision_per_query"][0, 0] == pytest.approx(rel_sorted.mean(), abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_tiny_databases(n):
    rng = np.random.default_rng(n)
    q, db, ql, dl = random_case(rng, 4, n, 16, 3, density=0.5)
    res = M.retrieval_metrics(q, db, ql, dl, map_k=(None, 1, 2), precision_k=(1, 3), threads=3)
    for i, (_, _, _, rel_sorted) in enumerate(ref_rankings(unpack(q), unpack(db), ql, dl)):
        assert res["ap"][i].tolist() == pytest.approx([ref_ap(rel_sorted, k) for k in (None, 1, 2)], abs=1e-12)
        assert res["precision_per_query"][i].tolist() == pytest.approx(
            [rel_sorted[: min(k, n)].mean() for k in (1, 3)], abs=1e-12
        )


def test_tie_aware_map_matches_brute_force_over_all_orderings():
    rng = np.random.default_rng(3)
    checked = 0
    for trial in range(40):
        n = int(rng.integers(1, 8))
        # 8-bit codes drawn from few values: big tie groups
        db = rng.choice(np.array([0, 1, 3, 7, 255], np.uint8), size=(n, 1))
        q = np.zeros((1, 1), np.uint8)
        dl = (rng.random((n, 3)) < 0.4).astype(np.uint8)
        ql = np.ones((1, 3), np.uint8)
        dist = unpack(db).sum(axis=1)
        rel = dl.any(axis=1)
        expect = brute_tie_aware_ap(dist, rel)
        got = M.tie_aware_map(q, db, ql, dl, threads=1)
        assert got == pytest.approx(expect, abs=1e-12), (dist, rel)
        checked += rel.any()
    assert checked > 20


def test_tie_aware_equals_plain_map_without_ties_and_differs_with_them():
    # Distinct distances 0..8: no ties, so tie-aware AP equals AP.
    db = np.array([[(1 << d) - 1] for d in range(9)], np.uint8)[::-1].copy()
    q = np.zeros((1, 1), np.uint8)
    dl = np.array([[1], [0], [1], [1], [0], [0], [1], [0], [0]], np.uint8)
    ql = np.ones((1, 1), np.uint8)
    assert M.tie_aware_map(q, db, ql, dl) == pytest.approx(M.mean_average_precision(q, db, ql, dl), abs=1e-15)
    # All tied, irrelevant item first in database order: stable AP is 1/2 * (1/2 + 2/3) ...
    db2 = np.zeros((3, 1), np.uint8)
    dl2 = np.array([[0], [1], [1]], np.uint8)
    stable = M.mean_average_precision(q, db2, ql, dl2)
    assert stable == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert M.tie_aware_map(q, db2, ql, dl2) == pytest.approx(brute_tie_aware_ap(np.zeros(3), np.array([0, 1, 1], bool)))
    assert M.tie_aware_map(q, db2, ql, dl2) != pytest.approx(stable)


def test_tie_aware_large_histograms_against_direct_sum():
    # Large tie groups far down the ranking: the closed form against the definition.
    rng = np.random.default_rng(11)
    ha = rng.integers(0, 3000, size=(5, 33))
    ha[:, ::3] = rng.integers(0, 3, size=(5, 11))  # small groups next to big ones
    hr = rng.binomial(ha, 0.3)
    got = M.tie_aware_ap_from_histograms(ha, hr)
    for q in range(5):
        total, n_less, r_less = 0.0, 0, 0
        for nd, ndp in zip(ha[q], hr[q]):
            if ndp:
                b = (ndp - 1) / (nd - 1) if nd > 1 else 0.0
                t = np.arange(1, nd + 1)
                total += ndp / nd * np.sum((r_less + 1 + (t - 1) * b) / (n_less + t))
            n_less += nd
            r_less += ndp
        assert got[q] == pytest.approx(total / hr[q].sum(), rel=1e-12)


def test_pr_curve_against_reference():
    rng = np.random.default_rng(5)
    q, db, ql, dl = random_case(rng, 17, 300, 16, 4, density=0.15)
    ql[0] = 0  # a query with no relevant item: excluded from recall, included in precision
    precision, recall = M.pr_curve(q, db, ql, dl, threads=2)
    assert precision.shape == recall.shape == (17,)
    dists, rels = [], []
    for dist, rel, _, _ in ref_rankings(unpack(q), unpack(db), ql, dl):
        dists.append(dist)
        rels.append(rel)
    for r in range(17):
        ps, rs = [], []
        for dist, rel in zip(dists, rels):
            inside = dist <= r
            if inside.any():
                ps.append(rel[inside].mean())
            if rel.any():
                rs.append(rel[inside].sum() / rel.sum())
        if ps:
            assert precision[r] == pytest.approx(np.mean(ps), abs=1e-12)
        else:
            assert np.isnan(precision[r])
        assert recall[r] == pytest.approx(np.mean(rs), abs=1e-12)
    assert recall[-1] == pytest.approx(1.0)


def test_plot_pr_curves_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(2)
    q, db, ql, dl = random_case(rng, 20, 400, 32, 5)
    path = tmp_path / "pr.png"
    M.plot_pr_curves({"I->T": M.pr_curve(q, db, ql, dl), "T->I": M.pr_curve(db[:20], q, dl[:20], ql)},
                     path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        M.plot_pr_curves({}, tmp_path / "x.png")


# ------------------------------------------------------------------- conventions


def test_perfect_codes_give_one():
    rng = np.random.default_rng(9)
    classes = rng.integers(0, 6, size=500)
    labels = np.eye(6, dtype=np.uint8)[classes]
    codes = np.where(rng.random((6, 64)) < 0.5, -1.0, 1.0)[classes]  # one code per class
    res = M.retrieval_metrics(codes[:50], codes, labels[:50], labels, map_k=(None, 10), precision_k=(20,),
                              tie_aware=True)
    assert res["map"] == {None: 1.0, 10: 1.0}
    assert res["precision"] == {20: 1.0}
    assert res["tie_aware_map"] == pytest.approx(1.0, abs=1e-12)


def test_queries_without_relevant_items_count_as_zero():
    rng = np.random.default_rng(4)
    q, db, ql, dl = random_case(rng, 10, 200, 32, 4, density=0.4)
    ql[[2, 7]] = 0
    res = M.retrieval_metrics(q, db, ql, dl, map_k=(None, 5), tie_aware=True)
    assert res["n_queries_without_relevant"] == 2
    assert (res["ap"][[2, 7]] == 0).all()
    assert res["map"][None] == pytest.approx(res["ap"][:, 0].sum() / 10)
    assert M.mean_average_precision(q, db, ql, dl) == pytest.approx(
        calc_map_k_literature(unpack(q) * 2.0 - 1, unpack(db) * 2.0 - 1, ql, dl), abs=1e-12
    )
    none = M.retrieval_metrics(q, db, np.zeros_like(ql), dl, tie_aware=True, pr=True)
    assert none["map"][None] == 0.0 and none["tie_aware_map"] == 0.0
    assert np.isnan(none["pr"][1]).all()


def test_map_at_k_is_a_rank_cutoff_unlike_literature_k():
    # Relevant items at positions 2 and 4 (distances 1..4, no ties)
    db = np.array([[0b0001], [0b0011], [0b0111], [0b1111]], np.uint8)
    dl = np.array([[0], [1], [0], [1]], np.uint8)
    q, ql = np.zeros((1, 1), np.uint8), np.ones((1, 1), np.uint8)
    assert M.mean_average_precision(q, db, ql, dl, k=3) == pytest.approx(1 / 2)  # only pos 2 counts
    assert M.mean_average_precision(q, db, ql, dl) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert M.mean_average_precision(q, db, ql, dl, k=10**9) == M.mean_average_precision(q, db, ql, dl)
    # the literature's k=1 keeps the first relevant hit wherever it is: 1/2 too, but k=3 differs
    qB, rB = unpack(q) * 2.0 - 1, unpack(db) * 2.0 - 1
    assert calc_map_k_literature(qB, rB, ql, dl, k=3) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert M.precision_at_k(q, db, ql, dl, 2) == pytest.approx(0.5)
    np.testing.assert_allclose(M.precision_at_k(q, db, ql, dl, [1, 4, 100]), [0.0, 0.5, 0.5])


def test_code_and_label_input_forms_agree():
    rng = np.random.default_rng(8)
    q, db, ql, dl = random_case(rng, 9, 150, 32, 5)
    base = M.retrieval_metrics(q, db, ql, dl, map_k=(None, 7), precision_k=(3,), tie_aware=True)
    signed_q = unpack(q).astype(np.float32) * 2 - 1
    real_db = (unpack(db) * 2.0 - 1) * rng.uniform(0.1, 3.0, size=(150, 32))
    other = M.retrieval_metrics(signed_q, real_db, ql.astype(bool), dl.astype(np.float64) * 0.5,
                                map_k=(None, 7), precision_k=(3,), tie_aware=True, threads=1)
    for key in ("map", "precision", "tie_aware_map"):
        assert other[key] == base[key]


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(12)
    q, db, ql, dl = random_case(rng, 31, 3000, 64, 6)
    runs = [M.retrieval_metrics(q, db, ql, dl, map_k=(None, 100), precision_k=(50,), threads=t) for t in (1, 2, 3, None)]
    for r in runs[1:]:
        assert np.array_equal(r["ap"], runs[0]["ap"]) and r["map"] == runs[0]["map"]


def test_matches_literature_calc_map_k_on_mirflickr_labels():
    labels = np.load(require(MIRFLICKR))["labels"]
    rng = np.random.default_rng(2024)
    idx = rng.permutation(labels.shape[0])[:5500]
    lab = labels[idx].astype(np.float32)
    bits = 32  # short codes: many ties, so the tie-break convention is exercised
    projection = rng.standard_normal((lab.shape[1], bits))
    signed = np.where(lab @ projection + 1.0 * rng.standard_normal((lab.shape[0], bits)) >= 0, 1.0, -1.0)
    qB, rB, qL, rL = signed[:500], signed[500:], lab[:500], lab[500:]
    expect = calc_map_k_literature(qB, rB, qL, rL)
    got = M.mean_average_precision(qB, rB, qL, rL)
    assert got == pytest.approx(expect, abs=1e-9)
    assert 0.3 < got < 1.0  # the labels carry signal into the codes
    packed = M.mean_average_precision(cmhash.pack_codes(qB), cmhash.pack_codes(rB), qL, rL, threads=2)
    assert packed == got


# ------------------------------------------------------------------------ errors


def test_bad_inputs_raise_typed_errors():
    rng = np.random.default_rng(1)
    q, db, ql, dl = random_case(rng, 4, 20, 32, 3)
    with pytest.raises(cmhash.CodeFormatError, match="bits"):
        M.mean_average_precision(q, db[:, :2], ql, dl)
    with pytest.raises(ValueError, match="label rows"):
        M.mean_average_precision(q, db, ql[:3], dl)
    with pytest.raises(ValueError, match="label rows"):
        M.mean_average_precision(q, db, ql, dl[:5])
    with pytest.raises(ValueError, match="classes"):
        M.mean_average_precision(q, db, ql, np.zeros((20, 4)))
    with pytest.raises(ValueError, match="empty"):
        M.mean_average_precision(q[:0], db, ql[:0], dl)
    with pytest.raises(ValueError, match="empty"):
        M.mean_average_precision(q, db[:0], ql, dl[:0])
    for bad in (0, -3):
        with pytest.raises(ValueError, match=">= 1"):
            M.mean_average_precision(q, db, ql, dl, k=bad)
        with pytest.raises(ValueError, match=">= 1"):
            M.precision_at_k(q, db, ql, dl, bad)
    with pytest.raises(TypeError):
        M.mean_average_precision(q, db, ql, dl, k=2.5)
    with pytest.raises(TypeError):
        M.precision_at_k(q, db, ql, dl, "10")
    with pytest.raises(ValueError):
        M.precision_at_k(q, db, ql, dl, [])
    with pytest.raises(ValueError, match="2-D"):
        M.mean_average_precision(q, db, ql[:, 0], dl)
    with pytest.raises(ValueError, match="threads"):
        M.mean_average_precision(q, db, ql, dl, threads=0)
    with pytest.raises(cmhash.CodeFormatError):
        M.mean_average_precision(q.astype(np.int32) * 0 + 3, db, ql, dl)  # 8 "bits" vs 32


def test_native_rank_metrics_validates_arguments():
    rng = np.random.default_rng(1)
    q, db, ql, dl = random_case(rng, 4, 20, 32, 3)
    ql, dl = np.packbits(ql, axis=1), np.packbits(dl, axis=1)

    def outs(nq=4, bins=33, nm=1, npk=0):
        return (np.zeros((nq, bins), np.int64), np.zeros((nq, bins), np.int64), np.zeros((nq, nm)),
                np.zeros((nq, npk)))

    _hamming.rank_metrics(q, db, ql, dl, [20], [], *outs())
    with pytest.raises(ValueError, match="hist_all"):
        _hamming.rank_metrics(q, db, ql, dl, [20], [], *outs(bins=32))
    with pytest.raises(ValueError, match=">= 1"):
        _hamming.rank_metrics(q, db, ql, dl, [0], [], *outs())
    with pytest.raises(TypeError):
        _hamming.rank_metrics(q, db, ql, dl, [True], [], *outs())
    with pytest.raises(TypeError):
        _hamming.rank_metrics(q, db, ql, dl, None, [], *outs())
    with pytest.raises(TypeError, match="uint8"):
        _hamming.rank_metrics(q.astype(np.int8), db, ql, dl, [20], [], *outs())
    with pytest.raises(ValueError, match="empty"):
        _hamming.rank_metrics(q, db[:0], ql, dl[:0], [20], [], *outs())
    with pytest.raises(ValueError, match="threads"):
        _hamming.rank_metrics(q, db, ql, dl, [20], [], *outs(), -1)
    with pytest.raises(TypeError, match="writable"):
        ro = outs()
        ro[2].flags.writeable = False
        _hamming.rank_metrics(q, db, ql, dl, [20], [], *ro)
    assert _hamming.rank_metrics.__doc__.startswith("rank_metrics(")


def test_native_rank_metrics_fuzz_never_crashes():
    """Random bytes, odd shapes, None and str for every argument, in a subprocess so a
    crash shows up as a signal instead of killing the test run."""
    script = textwrap.dedent(
        """
        import random, numpy as np
        from cmhash import _hamming
        rng = np.random.default_rng(0)
        random.seed(0)

        def candidate(kind):
            choice = random.randrange(12)
            if choice == 0: return None
            if choice == 1: return "abc"
            if choice == 2: return b"\\x00" * random.randrange(50)
            if choice == 3: return bytearray(random.randrange(64))
            if choice == 4: return rng.integers(0, 256, random.randrange(40), dtype=np.uint8)
            if choice == 5: return np.zeros((random.randrange(4), random.randrange(4), 2), np.uint8)
            if choice == 6: return [random.randrange(-3, 40) for _ in range(random.randrange(4))]
            if choice == 7: return np.zeros((random.randrange(5), random.randrange(4)), np.int64)
            if choice == 8: return np.zeros((random.randrange(5), random.randrange(4)), np.float64)
            if choice == 9: return rng.integers(0, 256, (random.randrange(6), random.randrange(1, 5)), dtype=np.uint8)
            if choice == 10: return np.zeros((5, 3), np.uint8)[:, ::2]
            return 10 ** random.randrange(30)
        ok = errors = 0
        for trial in range(4000):
            args = [candidate(i) for i in range(10)]
            if random.random() < 0.5:
                # mostly valid calls with one argument replaced: reach the deeper checks
                nq, n, nb, lb = random.randrange(0, 4), random.randrange(0, 6), random.randrange(1, 5), random.randrange(0, 3)
                nm, npk = random.randrange(0, 3), random.randrange(0, 3)
                good = [rng.integers(0, 256, (nq, nb), dtype=np.uint8), rng.integers(0, 256, (n, nb), dtype=np.uint8),
                        rng.integers(0, 256, (nq, lb), dtype=np.uint8), rng.integers(0, 256, (n, lb), dtype=np.uint8),
                        [random.randrange(1, 9) for _ in range(nm)], [random.randrange(1, 9) for _ in range(npk)],
                        np.zeros((nq, 8 * nb + 1), np.int64), np.zeros((nq, 8 * nb + 1), np.int64),
                        np.zeros((nq, nm)), np.zeros((nq, npk))]
                i = random.randrange(11)
                if i < 10:
                    good[i] = args[i]
                args = good
            try:
                _hamming.rank_metrics(*args, random.choice([0, 1, 2, 3]))
                ok += 1
            except (TypeError, ValueError, MemoryError, OverflowError):
                errors += 1
        print("survived", ok, errors)
        """
    )
    root = Path(__file__).resolve().parents[1]
    env_path = str(Path(cmhash.__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ok, errors = map(int, proc.stdout.split()[1:3])
    assert ok > 50 and errors > 500
