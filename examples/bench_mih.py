"""Benchmark: MultiIndex (multi-index hashing) against our flat scan (HashIndex), FAISS's
binary indexes (IndexBinaryFlat, IndexBinaryMultiHash, IndexBinaryHNSW) and usearch's
binary HNSW (b1x8, Hamming), in one run on the same codes and queries. Prints seconds,
queries/s, speedups over our flat scan, recall@k of the approximate indexes, build time and
index bytes per code, then the targets as measured ratios.

    PYTHONPATH=sdk python examples/bench_mih.py                       # 1M and 10M codes
    PYTHONPATH=sdk python examples/bench_mih.py --sizes 100000000 --data clustered,random --bits 64 --k 10
    PYTHONPATH=sdk python examples/bench_mih.py --quick               # smoke run, seconds

Codes:
  random     uniformly random bits: the worst case for multi-index hashing (near neighbours
             are far), where MultiIndex must fall back to the scan;
  clustered  signs of random Gaussian projections of a Gaussian mixture: CLUSTERS centres
             drawn from N(0, I) in LATENT dimensions, each point a centre plus N(0, SPREAD^2 I)
             noise, times a LATENT x bits matrix of N(0, 1) entries, sign -> bit (the way deep
             hashing codes come from features); queries are new draws of the same mixture;
  model      codes from a file (--model-codes: a .npy, or the codes.npz of cmhash encode),
             replicated to the size with each bit flipped with probability --noise.

Recall@k of an approximate index counts a returned item when its distance is at most the
exact k-th distance (so ties cannot lower it). Exactness of MultiIndex is checked: its ids
and distances must equal the flat scan's on every query.

Needs FAISS (``pip install faiss-cpu``, part of the dev extra); usearch is used if installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from cmhash.cli import exit_without_extra
from cmhash.cpus import cpu_name
from cmhash.index import HashIndex, MultiIndex, mih

CLUSTERS, LATENT, SPREAD = 10_000, 32, 0.35
TARGETS = {"speedup_10M": 20.0, "speedup_100M": 50.0, "random_slowdown": 1.2, "memory_ratio": 4.0, "build_10M_s": 10.0}


def clustered_codes(n: int, bits: int, seed: int, chunk: int = 1 << 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1234).standard_normal((CLUSTERS, LATENT)).astype(np.float32)
    proj = np.random.default_rng(4321 + bits).standard_normal((LATENT, bits)).astype(np.float32)
    out = np.empty((n, bits // 8), np.uint8)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = centers[rng.integers(0, CLUSTERS, e - s)]
        x += SPREAD * rng.standard_normal((e - s, LATENT), dtype=np.float32)
        out[s:e] = np.packbits(x @ proj > 0, axis=1, bitorder="little")
    return out


def model_codes(path: str, n: int, bits: int, noise: float, seed: int) -> np.ndarray:
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            base = z["codes"]
    else:
        base = np.load(path, allow_pickle=False)
    if base.shape[1] * 8 != bits:
        raise SystemExit(f"{path}: codes of {base.shape[1] * 8} bits, not {bits}")
    rng = np.random.default_rng(seed)
    out = base[rng.integers(0, len(base), n)]
    flips = np.packbits(rng.random((n, bits), dtype=np.float32) < noise, axis=1, bitorder="little")
    return out ^ flips


def make_data(kind: str, n: int, nq: int, bits: int, args) -> tuple[np.ndarray, np.ndarray]:
    path = os.path.join(args.cache, f"{kind}-{n}-{bits}.npy") if args.cache else None
    if path and os.path.exists(path):
        both = np.load(path)
    elif kind == "random":
        both = np.random.default_rng(bits).integers(0, 256, (n + nq, bits // 8), dtype=np.uint8)
    elif kind == "clustered":
        both = clustered_codes(n + nq, bits, seed=bits)
    else:
        both = model_codes(args.model_codes, n + nq, bits, args.noise, seed=bits)
    if path and not os.path.exists(path):
        np.save(path, both)
    return both[nq:], both[:nq]


def timed(fn, repeat: int):
    return timed_together([fn], repeat)[0]


def timed_together(fns, repeat: int):
    """[(best seconds, result)] of each function, their runs interleaved so that a change of
    the machine's speed during the runs touches all of them alike."""
    best, out = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            out[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return list(zip(best, out))


def recall(dist: np.ndarray, exact_dist: np.ndarray, k: int) -> float:
    kth = exact_dist[:, k - 1 : k]
    return float(((dist <= kth) & (dist >= 0)).sum(1).clip(max=k).mean() / k)


def run(args) -> list[dict]:
    exit_without_extra("dev", "faiss")
    import faiss
    try:
        from usearch.index import Index as UsearchIndex
    except ImportError:
        UsearchIndex = None
    rows = []

    def emit(**row):
        rows.append(row)
        extra = "".join(f" {key}={row[key]}" for key in ("speedup", "recall", "path") if row.get(key) is not None)
        print(f"{row['data']:9s} n={row['n']:>11,} bits={row['bits']:3d} k={row['k']:3d} threads={row['threads']} "
              f"{row['method']:22s} {row['seconds']:9.4f} s {row['qps']:>12,.0f} q/s{extra}", flush=True)

    for kind in args.data:
        for n in args.sizes:
            for bits in args.bits:
                db, q = make_data(kind, n, args.nq, bits, args)
                flat = HashIndex(bits)
                flat.add(db)
                multi = MultiIndex(bits)
                multi.add(db)
                build_s, _ = timed(multi.build_tables, 1)  # one thread
                mem = (multi.codes.nbytes + multi.table_bytes) / n
                info = dict(data=kind, n=n, bits=bits, build_s=round(build_s, 3), bytes_per_code=round(mem, 2),
                            memory_ratio=round(mem / (bits // 8), 2), substrings=multi.explain(q[:1], k=1)["substrings"])
                print(f"{kind} n={n:,} bits={bits}: MultiIndex build {build_s:.2f} s, {mem:.1f} bytes per code "
                      f"({info['memory_ratio']}x the codes), {info['substrings']} substrings", flush=True)
                rows.append({"method": "mih-build", **info})
                fdb = faiss.IndexBinaryFlat(bits)
                fdb.add(db)
                approx = {}
                m = info["substrings"] or mih.auto_substrings(bits, n)
                if "faiss-multihash" in args.baselines:
                    t = time.perf_counter()
                    fmh = faiss.IndexBinaryMultiHash(bits, m, bits // m)
                    fmh.add(db)
                    fmh.nflip = args.nflip
                    approx["faiss-multihash"] = (fmh, time.perf_counter() - t)
                if n <= args.hnsw_max and "faiss-hnsw" in args.baselines:
                    t = time.perf_counter()
                    fh = faiss.IndexBinaryHNSW(bits, 16)
                    fh.hnsw.efSearch = 64
                    fh.add(db)
                    approx["faiss-hnsw"] = (fh, time.perf_counter() - t)
                if n <= args.hnsw_max and "usearch" in args.baselines and UsearchIndex is not None:
                    t = time.perf_counter()
                    us = UsearchIndex(ndim=bits, metric="hamming", dtype="b1")
                    us.add(np.arange(n), db, threads=max(args.threads))
                    approx["usearch-b1x8"] = (us, time.perf_counter() - t)
                for threads in args.threads:
                    faiss.omp_set_num_threads(threads)
                    for k in args.k:
                        base = dict(data=kind, n=n, bits=bits, k=k, threads=threads)
                        (t_flat, (fd, fi)), (t_mih, (md, mi)) = timed_together(
                            [lambda: flat.search(q, k, threads=threads), lambda: multi.search(q, k, threads=threads)],
                            args.repeat)
                        emit(**base, method="cmhash-flat", seconds=t_flat, qps=len(q) / t_flat)
                        exact = bool(np.array_equal(fd, md) and np.array_equal(fi, mi))
                        path = multi.explain(q, k=k, threads=threads)["path"]
                        emit(**base, method="cmhash-mih", seconds=t_mih, qps=len(q) / t_mih,
                             speedup=round(t_flat / t_mih, 2), exact=exact, path=path,
                             **{key: info[key] for key in ("build_s", "bytes_per_code", "memory_ratio", "substrings")})
                        if not exact:
                            print("ERROR: MultiIndex results differ from the flat scan", file=sys.stderr)
                        if k not in args.baseline_k or threads not in args.baseline_threads:
                            continue
                        if "faiss-flat" in args.baselines:
                            t, (d, _) = timed(lambda: fdb.search(q, k), args.repeat)
                            emit(**base, method="faiss-flat", seconds=t, qps=len(q) / t,
                                 speedup=round(t_flat / t, 2), recall=round(recall(d, fd, k), 4))
                        for name, (index, build) in approx.items():
                            if name == "usearch-b1x8":
                                t, res = timed(lambda: index.search(q, k, threads=threads), args.repeat)
                                d = np.asarray(res.distances, dtype=np.float64).reshape(len(q), k)
                                d[np.asarray(res.keys).reshape(len(q), k) < 0] = -1
                            else:
                                t, (d, _) = timed(lambda: index.search(q, k), args.repeat)
                            emit(**base, method=name, seconds=t, qps=len(q) / t, speedup=round(t_flat / t, 2),
                                 recall=round(recall(d, fd, k), 4), build_s=round(build, 2))
                del flat, multi, fdb, approx
    return rows


def check_targets(rows: list[dict]) -> None:
    print(f"\nTargets ({cpu_name()}):")
    for row in rows:
        if row["method"] == "mih-build":
            if row["n"] >= 10_000_000:
                print(f"  build {row['data']} {row['n']:,} x {row['bits']} bits: {row['build_s']:.2f} s "
                      f"(target < {TARGETS['build_10M_s']} s for 10M)")
            print(f"  memory {row['data']} {row['n']:,} x {row['bits']}: {row['memory_ratio']}x the codes "
                  f"(target <= {TARGETS['memory_ratio']}x)")
            continue
        if row["method"] != "cmhash-mih":
            continue
        where = f"{row['data']} {row['n']:,} x {row['bits']} bits, k={row['k']}, {row['threads']} thread(s)"
        if row["data"] != "random" and row["k"] == 10 and row["threads"] == 1 and row["bits"] == 64 and row["n"] >= 10**7:
            goal = TARGETS["speedup_100M" if row["n"] >= 10**8 else "speedup_10M"]
            print(f"  speedup {where}: {row['speedup']}x over the flat scan (target >= {goal}x), exact={row['exact']}")
        if row["data"] == "random":
            print(f"  random {where}: {1 / row['speedup']:.2f}x the flat scan's time "
                  f"(target <= {TARGETS['random_slowdown']}x), path {row['path']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(float(x)) for x in s.split(",")]  # noqa: E731 - "1e7" works too
    parser.add_argument("--sizes", type=ints, default=[1_000_000, 10_000_000])
    parser.add_argument("--bits", type=ints, default=[64, 128])
    parser.add_argument("--k", type=ints, default=[1, 10, 100])
    parser.add_argument("--threads", type=ints, default=[1, 2])
    parser.add_argument("--nq", type=int, default=1000)
    parser.add_argument("--data", type=lambda s: s.split(","), default=["clustered", "random"])
    parser.add_argument("--model-codes", help="codes for --data model (.npy, or codes.npz of cmhash encode)")
    parser.add_argument("--noise", type=float, default=0.02, help="bit-flip probability for --data model")
    parser.add_argument("--nflip", type=int, default=2, help="FAISS IndexBinaryMultiHash nflip (default 2)")
    parser.add_argument("--baselines", type=lambda s: [] if s == "none" else s.split(","),
                        default=["faiss-flat", "faiss-multihash", "faiss-hnsw", "usearch"],
                        help="which of faiss-flat, faiss-multihash, faiss-hnsw, usearch to run, or none (default all)")
    parser.add_argument("--baseline-threads", type=ints, help="thread counts at which they run (default: all of --threads)")
    parser.add_argument("--baseline-k", type=ints, help="k values at which FAISS and usearch run (default: all of --k)")
    parser.add_argument("--hnsw-max", type=int, default=1_000_000, help="largest n for the HNSW indexes (slow builds)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per search (the best counts)")
    parser.add_argument("--cache", help="folder to keep generated codes in between runs")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    if "model" in args.data and not args.model_codes:
        parser.error("--data model needs --model-codes")
    args.baseline_k = args.baseline_k or args.k
    args.baseline_threads = args.baseline_threads or args.threads
    if args.quick:
        args.sizes, args.bits, args.k, args.threads, args.nq, args.repeat = [40_000], [64], [10], [1], 50, 1
        args.baseline_k = [10]
    print(f"CPU: {cpu_name()}, {os.cpu_count()} CPUs; codes cached in {args.cache or 'nothing'}", flush=True)
    rows = run(args)
    check_targets(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "rows": rows}, f, indent=1)
    return 1 if any(row.get("exact") is False for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
