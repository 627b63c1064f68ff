"""Benchmark: cmhash exact kNN against FAISS IndexBinaryFlat and a numpy baseline, in one
process on the same data. Prints queries/s and ratios, and checks that our distances
equal FAISS's (labels may differ only in tie order).

    PYTHONPATH=sdk python examples/bench_search.py            # full run (1M codes)
    PYTHONPATH=sdk python examples/bench_search.py --quick    # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import cmhash._hamming as h
from cmhash.search import knn_search


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def best_time(fn, repeat: int) -> float:
    """Best of `repeat` runs: the least disturbed by other processes on the machine."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def numpy_knn(q, db, k, chunk=65536):
    """Baseline: bitwise_count over chunks of the database, then argpartition."""
    nq = q.shape[0]
    words = db.view(np.uint64) if db.shape[1] % 8 == 0 else db
    qw = q.view(np.uint64) if db.shape[1] % 8 == 0 else q
    D = np.empty((nq, db.shape[0]), dtype=np.int32) if nq * db.shape[0] <= 2**28 else None
    if D is None:
        raise MemoryError("numpy baseline would need an nq x n matrix; shrink the case")
    for j in range(0, db.shape[0], chunk):
        blk = words[j : j + chunk]
        D[:, j : j + chunk] = np.bitwise_count(qw[:, None, :] ^ blk[None]).sum(2)
    idx = np.argpartition(D, k, axis=1)[:, :k]
    d = np.take_along_axis(D, idx, 1)
    order = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(d, order, 1), np.take_along_axis(idx, order, 1)


def same_up_to_ties(D, I, fD, fI) -> bool:
    return np.array_equal(D, fD) and all(
        set(I[i][D[i] < D[i, -1]].tolist()) == set(fI[i][fD[i] < fD[i, -1]].tolist()) for i in range(len(D))
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="database codes")
    ap.add_argument("--nq", type=int, default=1000, help="queries (64-bit cases)")
    ap.add_argument("--nq256", type=int, default=500, help="queries (256-bit case)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--single", type=int, default=50, help="single-query calls for the latency case")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--numpy-nq", type=int, default=20, help="queries for the (slow) numpy baseline")
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    args = ap.parse_args()
    if args.quick:
        args.n, args.nq, args.nq256, args.single, args.repeat, args.numpy_nq = 100_000, 100, 50, 10, 1, 5

    import faiss

    cores = os.cpu_count()
    print(f"machine: {cpu_model()}, {cores} cores; SIMD level: {h.get_simd_level()} "
          f"(available {', '.join(h.simd_levels())}); faiss {faiss.__version__}, numpy {np.__version__}")
    print(f"n={args.n:,} random codes, k={args.k}, best of {args.repeat}\n")
    rng = np.random.default_rng(0)
    rows = []
    checks = []

    def case(name, bits, nq, threads, targets):
        db = rng.integers(0, 256, (args.n, bits // 8), dtype=np.uint8)
        q = rng.integers(0, 256, (nq, bits // 8), dtype=np.uint8)
        index = faiss.IndexBinaryFlat(bits)
        index.add(db)
        for t in threads:
            faiss.omp_set_num_threads(t)
            ours = best_time(lambda: knn_search(q, db, args.k, threads=t), args.repeat)
            theirs = best_time(lambda: index.search(q, args.k), args.repeat)
            npq = q[: args.numpy_nq]
            base = best_time(lambda: numpy_knn(npq, db, args.k), 1) * nq / len(npq)
            D, I = knn_search(q, db, args.k, threads=t)
            fD, fI = index.search(q, args.k)
            checks.append((f"{name} t={t}", same_up_to_ties(D, I, fD, fI)))
            nD, _ = numpy_knn(npq, db, args.k)
            checks.append((f"{name} t={t} numpy", np.array_equal(nD, D[: len(npq)])))
            rows.append((f"{name}, {t} thread{'s' if t > 1 else ''}", nq / ours, nq / theirs, nq / base,
                         theirs / ours, targets.get(t)))
        return db, q, index

    db, q, index = case(f"64-bit, {args.nq} queries", 64, args.nq, (1, 2), {1: 3.0, 2: 3.0})

    # Latency: one query per call; ours splits the database over both threads, FAISS
    # parallelises over queries, so it uses one.
    faiss.omp_set_num_threads(cores)
    # Separate loops: interleaving lets FAISS's spinning OpenMP workers steal the CPU
    # from our threads (and ours from theirs).
    def latency(fn):
        times = []
        for i in range(args.single):
            qi = q[i % len(q) : i % len(q) + 1]
            t0 = time.perf_counter()
            fn(qi)
            times.append(time.perf_counter() - t0)
        return np.median(times)

    lat_faiss = latency(lambda qi: index.search(qi, args.k))
    time.sleep(0.5)  # let the OpenMP workers go to sleep
    lat_ours = latency(lambda qi: knn_search(qi, db, args.k, threads=cores))
    lat_one = latency(lambda qi: knn_search(qi, db, args.k, threads=1))
    lo, lf, l1 = lat_ours, lat_faiss, lat_one
    del db, q, index

    case(f"256-bit, {args.nq256} queries", 256, args.nq256, (1, 2), {1: 2.0, 2: 2.0})

    print(f"{'case':<34}{'ours q/s':>12}{'faiss q/s':>12}{'numpy q/s':>12}{'vs faiss':>10}{'target':>9}")
    for name, o, f, nbase, ratio, target in rows:
        mark = "" if target is None else (f">={target:.0f}x " + ("ok" if ratio >= target else "MISS"))
        print(f"{name:<34}{o:>12,.0f}{f:>12,.0f}{nbase:>12,.1f}{ratio:>9.2f}x {mark}")
    ratio = lo / lf
    print(f"\nsingle query latency (median of {args.single}, 64-bit): ours {lo * 1e3:.3f} ms "
          f"({cores} threads over the database), faiss {lf * 1e3:.3f} ms; ours/faiss = {ratio:.2f}x "
          f"(target <= 0.67x: {'ok' if ratio <= 0.67 else 'MISS'}); ours on 1 thread {l1 * 1e3:.3f} ms "
          f"= {l1 / lf:.2f}x (thread start-up dominates a single query on this machine)")
    print("\nresults equal FAISS's distances (labels up to tie order) and numpy's distances:")
    for name, ok in checks:
        print(f"  {name:<40} {'yes' if ok else 'NO'}")
    if not all(ok for _, ok in checks):
        raise SystemExit("result mismatch")


if __name__ == "__main__":
    main()
