"""Benchmark: cmhash exact kNN against FAISS IndexBinaryFlat and a numpy baseline, on the
same data. cmhash is timed at each SIMD level of its kernels (pinned in turn, as
CMHASH_SIMD would); FAISS runs with the instruction set it picks for this CPU and, in a
second process, pinned to AVX2, so that both sides can be compared without AVX-512.
Prints queries/s and ratios (best and median of the repeats), and checks that our
distances equal FAISS's and numpy's (labels may differ only in tie order).

    PYTHONPATH=sdk python examples/bench_search.py                 # full run (1M codes)
    PYTHONPATH=sdk python examples/bench_search.py --quick         # smoke run, a few seconds
    PYTHONPATH=sdk python examples/bench_search.py --levels avx2   # one SIMD level only

Needs FAISS (``pip install faiss-cpu``, part of the dev extra).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import cmhash._hamming as h
from cmhash.cli import exit_without_extra
from cmhash.cpus import cpu_name
from cmhash.search import knn_search

# Environment that pins FAISS to AVX2: builds with one library per instruction set read
# FAISS_OPT_LEVEL when loading; dynamic-dispatch builds (FAISS >= 1.13) read FAISS_SIMD_LEVEL.
FAISS_AVX2_ENV = {"FAISS_OPT_LEVEL": "avx2", "FAISS_SIMD_LEVEL": "AVX2"}
# Targets (ours / FAISS) for the AVX2 kernels against FAISS on AVX2, and for the best
# kernels against FAISS as it runs by default.
TARGETS = {64: {"avx2": 3.5, "best": 3.0}, 256: {"avx2": 2.0, "best": 2.0}}


def faiss_level(faiss) -> str:
    """The instruction set FAISS runs with, where the build says."""
    config = getattr(faiss, "SIMDConfig", None)
    if config is not None and hasattr(config, "get_level_name"):
        return config.get_level_name()
    return ",".join(sorted(getattr(faiss.loader, "instruction_sets", []))) or "unknown"


def timings(fn, repeat: int) -> tuple[float, float]:
    """(best, median) seconds of `repeat` runs: the best is the least disturbed by other
    processes, the median shows how noisy the machine was."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), float(np.median(times))


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


def make_case(bits: int, nq: int, n: int):
    """The same data in every process: the seed depends only on the code length."""
    rng = np.random.default_rng(bits)
    db = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    q = rng.integers(0, 256, (nq, bits // 8), dtype=np.uint8)
    return db, q


def measure(faiss, args, cases, threads, levels) -> dict:
    """{(bits, threads, who): (best, median) seconds}, who being "faiss" or a cmhash level.
    Runs are interleaved (FAISS, then each level, `repeat` times) so that every ratio
    compares runs made under the same load."""
    out = {}
    before = h.get_simd_level()
    for bits, nq in cases:
        db, q = make_case(bits, nq, args.n)
        index = faiss.IndexBinaryFlat(bits)
        index.add(db)
        for t in threads:
            faiss.omp_set_num_threads(t)
            runs = {who: [] for who in ["faiss", *levels]}
            for _ in range(args.repeat):
                runs["faiss"].append(timings(lambda: index.search(q, args.k), 1)[0])
                for level in levels:
                    h.set_simd_level(level)
                    runs[level].append(timings(lambda: knn_search(q, db, args.k, threads=t), 1)[0])
            out.update({(bits, t, who): (min(v), float(np.median(v))) for who, v in runs.items()})
    h.set_simd_level(before)
    return out


def measure_with_faiss_avx2(args, levels) -> tuple[str, dict]:
    """measure() in a child process with FAISS pinned to AVX2, which must be chosen before
    FAISS loads."""
    cmd = [sys.executable, __file__, "--faiss-child", "--n", str(args.n), "--nq", str(args.nq),
           "--nq256", str(args.nq256), "--k", str(args.k), "--repeat", str(args.repeat), "--levels", *levels]
    proc = subprocess.run(cmd, env={**os.environ, **FAISS_AVX2_ENV}, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["level"], {tuple(key): tuple(v) for key, v in result["times"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="database codes")
    ap.add_argument("--nq", type=int, default=1000, help="queries (64-bit cases)")
    ap.add_argument("--nq256", type=int, default=1000, help="queries (256-bit case)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--single", type=int, default=50, help="single-query calls for the latency case")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--numpy-nq", type=int, default=20, help="queries for the (slow) numpy baseline")
    ap.add_argument("--levels", nargs="+", metavar="LEVEL",
                    help="cmhash SIMD levels to time (default: every level this CPU has but 'generic')")
    ap.add_argument("--no-faiss-avx2", action="store_true", help="skip FAISS pinned to AVX2")
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--faiss-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:  # smaller defaults; options given explicitly still win
        ap.set_defaults(n=100_000, nq=100, nq256=50, single=10, repeat=1, numpy_nq=5)
        args = ap.parse_args()

    exit_without_extra("dev", "faiss")
    import faiss

    cases = [(64, args.nq), (256, args.nq256)]
    threads = (1, 2)
    available = h.simd_levels()
    levels = args.levels or [lv for lv in available if lv != "generic"] or ["generic"]
    unknown = [lv for lv in levels if lv not in available]
    if unknown:
        raise SystemExit(f"--levels: this CPU cannot run {', '.join(unknown)} (it has {', '.join(available)})")
    if args.faiss_child:
        times = measure(faiss, args, cases, threads, levels)
        print(json.dumps({"level": faiss_level(faiss), "times": [[list(key), v] for key, v in times.items()]}))
        return
    cores = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {cpu_name()}, {cores} cores, load average {load:.1f} at start; cmhash levels "
          f"{', '.join(levels)} (available {', '.join(available)}); faiss {faiss.__version__} "
          f"({faiss_level(faiss)}), numpy {np.__version__}")
    print(f"n={args.n:,} random codes, k={args.k}, {args.repeat} runs each\n")

    pinned_level, pinned = (None, {}) if args.no_faiss_avx2 else measure_with_faiss_avx2(args, levels)
    times = measure(faiss, args, cases, threads, levels)
    before = h.get_simd_level()
    rows, checks = [], []
    for bits, nq in cases:
        db, q = make_case(bits, nq, args.n)
        index = faiss.IndexBinaryFlat(bits)
        index.add(db)
        npq = q[: args.numpy_nq]
        base = timings(lambda: numpy_knn(npq, db, args.k), 1)[0] * nq / len(npq)
        nD, _ = numpy_knn(npq, db, args.k)
        for t in threads:
            faiss.omp_set_num_threads(t)
            fD, fI = index.search(q, args.k)
            for level in levels:
                h.set_simd_level(level)
                D, I = knn_search(q, db, args.k, threads=t)
                name = f"{bits}-bit, {t} thread{'s' if t > 1 else ''}, {level}"
                checks.append((f"{name}: faiss", same_up_to_ties(D, I, fD, fI)))
                checks.append((f"{name}: numpy", np.array_equal(nD, D[: len(npq)])))
                vs_pinned = None
                if pinned:  # ours over FAISS, both timed in the child
                    vs_pinned = (pinned[(bits, t, "faiss")], pinned[(bits, t, level)])
                rows.append((bits, t, level, nq, times[(bits, t, level)], times[(bits, t, "faiss")], vs_pinned,
                             nq / base))
        h.set_simd_level(before)
        if bits == 64:
            lat = latency(faiss, index, db, q, args.k, args.single, cores)
        del db, q, index

    best_level = available[-1]
    print(f"{'case':<30}{'ours q/s':>10}{'faiss q/s':>11}{'vs faiss':>16}{'faiss avx2':>12}{'vs avx2':>16}"
          f"{'numpy q/s':>11}  target")
    for bits, t, level, nq, ours, fdef, pin, nps in rows:
        name = f"{bits}-bit, {t} thread{'s' if t > 1 else ''}, {level}"
        vs_def = (fdef[0] / ours[0], fdef[1] / ours[1])
        fpin = pin[0] if pin else None
        vs_pin = (pin[0][0] / pin[1][0], pin[0][1] / pin[1][1]) if pin else None
        target = ""
        if level == "avx2" and vs_pin:
            goal = TARGETS[bits]["avx2"]
            target = f">={goal}x vs avx2: " + ("ok" if vs_pin[0] >= goal else "MISS")
        elif level == best_level and level != "avx2":
            goal = TARGETS[bits]["best"]
            target = f">={goal}x vs faiss: " + ("ok" if vs_def[0] >= goal else "MISS")
        pin_cols = (f"{nq / fpin[0]:>12,.0f}{vs_pin[0]:>8.2f}x ({vs_pin[1]:.2f})" if vs_pin
                    else f"{'-':>12}{'-':>16}")
        print(f"{name:<30}{nq / ours[0]:>10,.0f}{nq / fdef[0]:>11,.0f}{vs_def[0]:>8.2f}x ({vs_def[1]:.2f})"
              f"{pin_cols}{nps:>11,.1f}  {target}")
    print(f"\nratios: FAISS time over ours, best of {args.repeat} interleaved runs (median in brackets); "
          f"faiss: {faiss_level(faiss)}" + (f"; faiss avx2: {pinned_level}, timed with ours again in a "
                                             f"second process" if pinned_level else ""))
    if pinned_level is not None and "AVX2" not in pinned_level.upper():
        print(f"WARNING: FAISS did not take the AVX2 pin (it runs {pinned_level})")
    lo, lf, l1 = lat
    ratio = lo / lf
    print(f"\nsingle query latency (median of {args.single}, 64-bit, {h.get_simd_level()}): ours {lo * 1e3:.3f} ms "
          f"({cores} threads over the database), faiss {lf * 1e3:.3f} ms; ours/faiss = {ratio:.2f}x "
          f"(target <= 0.67x: {'ok' if ratio <= 0.67 else 'MISS'}); ours on 1 thread {l1 * 1e3:.3f} ms "
          f"= {l1 / lf:.2f}x (thread start-up dominates a single query on this machine)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")
    print("\nresults equal FAISS's distances (labels up to tie order) and numpy's distances:")
    for name, ok in checks:
        print(f"  {name:<44} {'yes' if ok else 'NO'}")
    if not all(ok for _, ok in checks):
        raise SystemExit("result mismatch")


def latency(faiss, index, db, q, k: int, single: int, cores: int) -> tuple[float, float, float]:
    """Median seconds of one-query calls: ours over all cores, FAISS, ours on one thread.
    Ours splits the database over the threads; FAISS parallelises over queries, so it
    uses one."""
    faiss.omp_set_num_threads(cores)

    # Separate loops: interleaving lets FAISS's spinning OpenMP workers steal the CPU
    # from our threads (and ours from theirs).
    def run(fn):
        times = []
        for i in range(single):
            qi = q[i % len(q) : i % len(q) + 1]
            t0 = time.perf_counter()
            fn(qi)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    lat_faiss = run(lambda qi: index.search(qi, k))
    time.sleep(0.5)  # let the OpenMP workers go to sleep
    return (run(lambda qi: knn_search(qi, db, k, threads=cores)), lat_faiss,
            run(lambda qi: knn_search(qi, db, k, threads=1)))


if __name__ == "__main__":
    main()
