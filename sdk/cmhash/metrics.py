"""Retrieval metrics for cross-modal hashing: mAP, tie-aware mAP, P@k, PR curves.

Every function ranks the database for each query by Hamming distance in one native
pass (``cmhash._hamming.rank_metrics``): no sort, the GIL released, threads over queries.

Conventions, the same in every function here:

* **Relevance**: a database item is relevant to a query when they share at least one
  label (multi-hot rows with a common non-zero column), as in the DCMH lineage.
* **Ranking**: ascending Hamming distance, **ties broken by database position** (what a
  stable sort on distance gives). ``tie_aware_map`` instead averages over every order of
  the tied items.
* **Queries with no relevant item** count as AP 0 and stay in the denominator, as the
  papers' ``calc_map_k`` does (it skips them but divides by all queries). Their number is
  reported as ``n_queries_without_relevant`` by :func:`retrieval_metrics`.
* **k** is a rank cutoff: only the top ``k`` positions of the ranking are looked at;
  ``k`` larger than the database means the whole ranking.
* Codes are packed uint8 (``cmhash.pack_codes`` layout) or unpacked ±1 / real / bool
  arrays, packed here by sign (see :func:`cmhash.codes.ensure_packed`). Labels are
  multi-hot ``(n, classes)`` arrays of any numeric or bool dtype; non-zero means present.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping, Sequence

import numpy as np

from . import _hamming
from .codes import ensure_packed
from .errors import ArgumentTypeError, CodeFormatError, InvalidArgumentError

__all__ = [
    "retrieval_metrics",
    "mean_average_precision",
    "tie_aware_map",
    "precision_at_k",
    "pr_curve",
    "plot_pr_curves",
    "tie_aware_ap_from_histograms",
    "pr_curve_from_histograms",
]


# --------------------------------------------------------------------------- inputs


def _pack_labels(labels, func: str, name: str) -> np.ndarray:
    """Multi-hot (n, classes) -> packed uint8 rows, padded to 1, 2, 4 or 8m bytes (the
    widths the native relevance test has fast loops for; zero padding changes nothing)."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise InvalidArgumentError(
            f"{func}: {name} must be a 2-D multi-hot array (n, classes), got shape {arr.shape}; "
            "turn class ids into multi-hot rows first, e.g. np.eye(classes)[ids]"
        )
    if arr.dtype.kind not in "biuf":
        raise InvalidArgumentError(f"{func}: {name} must be numeric or bool, got dtype {arr.dtype}")
    if arr.shape[1] == 0:
        raise InvalidArgumentError(f"{func}: {name} have zero classes; relevance needs at least one")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise InvalidArgumentError(f"{func}: {name} contain NaN")
    packed = np.packbits(arr != 0, axis=1)
    width = packed.shape[1]
    target = width if width in (1, 2, 4) else (width + 7) // 8 * 8
    if target != width:
        packed = np.pad(packed, ((0, 0), (0, target - width)))
    return np.ascontiguousarray(packed)


def _check_k(k, func: str, name: str, allow_none: bool) -> int | None:
    if k is None and allow_none:
        return None
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
        what = "an int >= 1 or None" if allow_none else "an int >= 1"
        raise ArgumentTypeError(f"{func}: {name} must be {what}, got {k!r}")
    if k <= 0:
        raise InvalidArgumentError(f"{func}: {name} must be >= 1, got {k}")
    return int(k)


def _check_threads(threads, func: str) -> int:
    if threads is None:
        return 0
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, numbers.Integral):
        raise ArgumentTypeError(f"{func}: threads must be an int >= 1 or None (all CPUs), got {threads!r}")
    if threads < 1:
        raise InvalidArgumentError(f"{func}: threads must be >= 1 or None (all CPUs), got {threads}")
    return int(threads)


def _prepare(q_codes, db_codes, q_labels, db_labels, func: str):
    q = ensure_packed(q_codes, func, "q_codes")
    db = ensure_packed(db_codes, func, "db_codes")
    if q.shape[1] != db.shape[1]:
        raise CodeFormatError(
            f"{func}: query codes have {q.shape[1] * 8} bits but database codes {db.shape[1] * 8}; "
            "both sides must come from hash heads of the same length"
        )
    ql = _pack_labels(q_labels, func, "q_labels")
    dbl = _pack_labels(db_labels, func, "db_labels")
    if ql.shape[0] != q.shape[0]:
        raise InvalidArgumentError(f"{func}: {q.shape[0]} query codes but {ql.shape[0]} query label rows")
    if dbl.shape[0] != db.shape[0]:
        raise InvalidArgumentError(f"{func}: {db.shape[0]} database codes but {dbl.shape[0]} database label rows")
    if np.shape(q_labels)[1] != np.shape(db_labels)[1]:
        raise InvalidArgumentError(
            f"{func}: query labels have {np.shape(q_labels)[1]} classes but database labels "
            f"{np.shape(db_labels)[1]}; both must use the same label vocabulary"
        )
    if q.shape[0] == 0:
        raise InvalidArgumentError(f"{func}: the query set is empty; a mean over no queries is undefined")
    if db.shape[0] == 0:
        raise InvalidArgumentError(f"{func}: the database is empty; there is nothing to rank")
    return q, db, ql, dbl


# ---------------------------------------------------------------------- histograms

_EULER_GAMMA = 0.57721566490153286061
_EXACT_HARMONIC = 64  # up to this, harmonic numbers come from a table
# H(0..64), each correctly rounded (math.fsum), so small-c differences are a few ulp.
_HARMONIC_TABLE = np.array([math.fsum(1.0 / j for j in range(1, i + 1)) for i in range(_EXACT_HARMONIC + 1)])


def _harmonic_tail(x: np.ndarray) -> np.ndarray:
    """H(x) - ln(x) - gamma for x > 64 (asymptotic series; truncation error < 1e-19 there)."""
    inv2 = 1.0 / (x * x)
    return 0.5 / x - inv2 * (1.0 / 12 - inv2 * (1.0 / 120 - inv2 * (1.0 / 252 - inv2 / 240)))


def _harmonic_diff(c: np.ndarray, m: np.ndarray) -> np.ndarray:
    """H(c + m) - H(c) = sum_{t=1..m} 1/(c + t) for integer arrays c >= 0, m >= 0,
    accurate to a few ulp even when c is large and m small (no cumulative-sum table,
    whose rounding would swamp 1/c-sized differences)."""
    c = np.asarray(c, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    table = _HARMONIC_TABLE

    def harmonic(x):
        small = x <= _EXACT_HARMONIC
        xs = np.where(small, _EXACT_HARMONIC + 1, x)  # keeps the series away from x = 0
        exact = table[np.where(small, x, 0).astype(np.int64)]
        return np.where(small, exact, np.log(xs) + _EULER_GAMMA + _harmonic_tail(xs))

    big = c > _EXACT_HARMONIC
    cb = np.where(big, c, _EXACT_HARMONIC + 1)
    far = np.log1p(m / cb) + _harmonic_tail(cb + m) - _harmonic_tail(cb)
    return np.where(big, far, harmonic(c + m) - harmonic(c))


def tie_aware_ap_from_histograms(hist_all, hist_rel) -> np.ndarray:
    """Per-query tie-aware AP (He et al., CVPR 2018) from distance histograms.

    ``hist_all[q, d]`` / ``hist_rel[q, d]``: items / relevant items at distance d. The
    result is the expected AP over uniformly random orders within each tie group:
    with n_d items, n_d+ relevant, N (R) items (relevant items) at smaller distances,

        AP = 1/R_total * sum_d n_d+/n_d * sum_{t=1..n_d} (R + 1 + (t-1) b) / (N + t),
        b = (n_d+ - 1) / (n_d - 1)  (0 when n_d = 1),

    and the inner sum is n_d b + (R + 1 - b (N + 1)) (H(N + n_d) - H(N)) with harmonic
    numbers H. Queries with no relevant item get 0.
    """
    na = np.asarray(hist_all, dtype=np.int64)
    nr = np.asarray(hist_rel, dtype=np.int64)
    n_less = np.cumsum(na, axis=1) - na
    r_less = np.cumsum(nr, axis=1) - nr
    r_total = nr.sum(axis=1)
    cells = nr > 0  # only tie groups holding relevant items contribute
    nd = na[cells].astype(np.float64)
    ndp = nr[cells].astype(np.float64)
    c = n_less[cells].astype(np.float64)
    a = r_less[cells].astype(np.float64) + 1.0
    b = np.where(nd > 1, (ndp - 1.0) / np.maximum(nd - 1.0, 1.0), 0.0)
    inner = nd * b + (a - b * (c + 1.0)) * _harmonic_diff(c, nd)
    terms = np.zeros(na.shape, dtype=np.float64)
    terms[cells] = ndp / nd * inner
    sums = terms.sum(axis=1)
    return np.divide(sums, r_total, out=np.zeros_like(sums), where=r_total > 0)


def pr_curve_from_histograms(hist_all, hist_rel) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall within Hamming radius r = 0..bits, averaged over queries.

    At radius r a query retrieves every item at distance <= r. Its precision there is
    relevant retrieved / retrieved and counts only for queries that retrieve at least
    one item at that radius; its recall is relevant retrieved / all relevant and counts
    only for queries with at least one relevant item. A radius where no query qualifies
    gets NaN (plots leave a gap there). Both arrays have length bits + 1.
    """
    within = np.cumsum(np.asarray(hist_all, dtype=np.int64), axis=1)
    rel_within = np.cumsum(np.asarray(hist_rel, dtype=np.int64), axis=1)
    r_total = rel_within[:, -1:]
    has_items = within > 0
    prec = np.divide(rel_within, within, out=np.zeros(within.shape), where=has_items)
    n_prec = has_items.sum(axis=0)
    precision = np.full(within.shape[1], np.nan)
    np.divide(prec.sum(axis=0), n_prec, out=precision, where=n_prec > 0)
    has_rel = r_total[:, 0] > 0
    if has_rel.any():
        recall = (rel_within[has_rel] / r_total[has_rel]).mean(axis=0)
    else:
        recall = np.full(within.shape[1], np.nan)
    return precision, recall


# ------------------------------------------------------------------------ the pass


def retrieval_metrics(
    q_codes,
    db_codes,
    q_labels,
    db_labels,
    map_k: Sequence[int | None] = (None,),
    precision_k: Sequence[int] = (),
    pr: bool = False,
    tie_aware: bool = False,
    threads: int | None = None,
) -> dict:
    """Every rank-based metric of one retrieval direction (e.g. I->T) in one native pass.

    Args:
        q_codes, db_codes: packed uint8 codes (n, bits/8), or unpacked (n, bits) ±1,
            real-valued (packed by sign) or bool codes. Same bit length on both sides.
        q_labels, db_labels: multi-hot (n, classes) labels, any numeric or bool dtype.
        map_k: cutoffs for mAP; ``None`` is mAP@all. See :func:`mean_average_precision`.
        precision_k: cutoffs for precision@k (top k of the ranking, ties by position).
        pr: also return the PR curve over Hamming radius (:func:`pr_curve`).
        tie_aware: also return the tie-aware mAP (:func:`tie_aware_map`).
        threads: native threads over queries; ``None`` uses every CPU. Results do not
            depend on it.

    Returns:
        dict with ``"map"`` ({k: mAP}, k ``None`` for all), ``"precision"`` ({k: P@k}),
        ``"tie_aware_map"`` (float, when asked), ``"pr"`` ((precision, recall), when
        asked), per-query ``"ap"`` (nq, len(map_k)) and ``"precision_per_query"``
        (nq, len(precision_k)), the histograms ``"hist_all"`` / ``"hist_rel"`` (nq, bits+1),
        and ``"n_queries"``, ``"n_database"``, ``"bits"``, ``"n_queries_without_relevant"``.

    Raises:
        CodeFormatError: codes of the wrong dtype/shape, or different bit lengths.
        ValueError: row counts of codes and labels differ, label widths differ, an empty
            query set or database, or a cutoff <= 0.
        TypeError: a cutoff or ``threads`` that is not an int.
    """
    func = "retrieval_metrics"
    map_ks = [_check_k(k, func, "map_k entry", allow_none=True) for k in map_k]
    prec_ks = [_check_k(k, func, "precision_k entry", allow_none=False) for k in precision_k]
    nthreads = _check_threads(threads, func)
    q, db, ql, dbl = _prepare(q_codes, db_codes, q_labels, db_labels, func)
    return _run(q, db, ql, dbl, map_ks, prec_ks, pr, tie_aware, nthreads)


def _run(q, db, ql, dbl, map_ks, prec_ks, pr, tie_aware, nthreads) -> dict:
    nq, n, bits = q.shape[0], db.shape[0], q.shape[1] * 8
    hist_all = np.zeros((nq, bits + 1), dtype=np.int64)
    hist_rel = np.zeros((nq, bits + 1), dtype=np.int64)
    ap = np.zeros((nq, len(map_ks)), dtype=np.float64)
    prec = np.zeros((nq, len(prec_ks)), dtype=np.float64)
    native_map = [n if k is None else min(k, n) for k in map_ks]
    native_prec = [min(k, n) for k in prec_ks]
    _hamming.rank_metrics(q, db, ql, dbl, native_map, native_prec, hist_all, hist_rel, ap, prec, nthreads)
    out = {
        "map": {k: float(ap[:, i].mean()) for i, k in enumerate(map_ks)},
        "precision": {k: float(prec[:, i].mean()) for i, k in enumerate(prec_ks)},
        "ap": ap,
        "precision_per_query": prec,
        "hist_all": hist_all,
        "hist_rel": hist_rel,
        "n_queries": nq,
        "n_database": n,
        "bits": bits,
        "n_queries_without_relevant": int((hist_rel.sum(axis=1) == 0).sum()),
    }
    if tie_aware:
        out["tie_aware_map"] = float(tie_aware_ap_from_histograms(hist_all, hist_rel).mean())
    if pr:
        out["pr"] = pr_curve_from_histograms(hist_all, hist_rel)
    return out


# --------------------------------------------------------------- convenience views


def mean_average_precision(q_codes, db_codes, q_labels, db_labels, k: int | None = None,
                           threads: int | None = None) -> float:
    """mAP over the queries, ranking by Hamming distance with ties broken by database position.

    ``k=None`` (mAP@all) is exactly what the papers' ``calc_map_k`` (DCMH, DCHMT, DSPH,
    EGATH, TEGAH code) computes when its ranking sort is stable: per query, the mean over
    all relevant items of (rank among relevant items) / (position in the ranking); a
    query with no relevant item has AP 0 and still counts in the mean.

    With an int ``k`` this is the textbook AP@k with a **rank cutoff**: the mean of the
    precision at each relevant position <= k, over the relevant items in the top k (0 if
    there are none). The literature's ``calc_map_k(..., k)`` differs: its ``k`` caps how
    many relevant hits are averaged (the first min(k, #relevant) of them, however deep in
    the ranking), not the rank, so its numbers for a finite k are not comparable to
    ours. Both agree for ``k=None``, and ``k`` >= database size equals ``k=None``.
    """
    k = _check_k(k, "mean_average_precision", "k", allow_none=True)
    res = retrieval_metrics(q_codes, db_codes, q_labels, db_labels, map_k=(k,), threads=threads)
    return res["map"][k]


def tie_aware_map(q_codes, db_codes, q_labels, db_labels, threads: int | None = None) -> float:
    """Tie-aware mAP (He, Cakir, Bargal, Sclaroff, "Hashing as Tie-Aware Learning to
    Rank", CVPR 2018): the expected AP@all when items at equal Hamming distance come in a
    uniformly random order, so it does not depend on how ties are broken. Queries with no
    relevant item count as 0, as in :func:`mean_average_precision`."""
    res = retrieval_metrics(q_codes, db_codes, q_labels, db_labels, map_k=(), tie_aware=True,
                            threads=threads)
    return res["tie_aware_map"]


def precision_at_k(q_codes, db_codes, q_labels, db_labels, k, threads: int | None = None):
    """Mean precision of the top k items (ties broken by database position).

    ``k`` is an int (returns a float) or a sequence of ints (returns an array). A ``k``
    larger than the database is taken as the database size (the precision of the
    whole ranking), so the denominator is never larger than what was retrieved.
    """
    func = "precision_at_k"
    single = isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_))
    ks = [k] if single else list(k) if isinstance(k, (Sequence, np.ndarray)) else None
    if ks is None:
        raise ArgumentTypeError(f"{func}: k must be an int or a sequence of ints, got {k!r}")
    if not ks:
        raise InvalidArgumentError(f"{func}: k is an empty sequence")
    res = retrieval_metrics(q_codes, db_codes, q_labels, db_labels, map_k=(), precision_k=ks,
                            threads=threads)
    values = res["precision_per_query"].mean(axis=0)
    return float(values[0]) if single else values


def pr_curve(q_codes, db_codes, q_labels, db_labels, threads: int | None = None):
    """Precision and recall at Hamming radius r = 0..bits, averaged over queries.

    Returns ``(precision, recall)``, two float64 arrays of length bits + 1. Precision at r
    is averaged over the queries that retrieve at least one item within radius r;
    recall over the queries that have at least one relevant item. NaN where no query
    qualifies (e.g. precision at small radii when no code is that close to any query).
    """
    res = retrieval_metrics(q_codes, db_codes, q_labels, db_labels, map_k=(), pr=True,
                            threads=threads)
    return res["pr"]


def plot_pr_curves(curves: Mapping[str, tuple], path, title: str | None = None) -> None:
    """Write a PNG of PR curves, e.g. ``{"I->T": pr_curve(...), "T->I": pr_curve(...)}``.

    Needs matplotlib (``pip install "cmhash-sdk[plot]"``). No pyplot state is touched.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'plot_pr_curves needs matplotlib; install it with: pip install "cmhash-sdk[plot]"'
        ) from exc
    if not curves:
        raise InvalidArgumentError("plot_pr_curves: no curves given")
    fig = Figure(figsize=(6, 4.5), dpi=120)
    ax = fig.add_subplot()
    for name, pair in curves.items():
        if len(pair) != 2:
            raise InvalidArgumentError(f"plot_pr_curves: curve {name!r} must be a (precision, recall) pair")
        precision, recall = (np.asarray(x, dtype=np.float64) for x in pair)
        if precision.shape != recall.shape or precision.ndim != 1:
            raise InvalidArgumentError(
                f"plot_pr_curves: curve {name!r}: precision and recall must be 1-D arrays of one "
                f"length, got {precision.shape} and {recall.shape}"
            )
        ax.plot(recall, precision, marker=".", markersize=3, linewidth=1.2, label=str(name))
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    ax.set_title(title if title is not None else "Precision-recall by Hamming radius")
    fig.tight_layout()
    fig.savefig(path, format="png")
