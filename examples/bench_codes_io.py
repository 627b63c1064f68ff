"""Benchmark: reading codes from Parquet against codes.npz, and a sharded index against one
index over the same codes, in the same run. Prints seconds and ratios (best of the repeats,
and the median to show how noisy the machine was), and checks that the answers agree.

    PYTHONPATH=sdk python examples/bench_codes_io.py               # 1M 64-bit codes, 8 shards
    PYTHONPATH=sdk python examples/bench_codes_io.py --n 20000 --shards 4 --repeat 1   # smoke run

Needs pyarrow (``pip install "cmhash-sdk[parquet]"``, part of the dev extra).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from cmhash.cli import exit_without_extra
from cmhash.cpus import cpu_name


def timed(fn, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="codes (default 1,000,000)")
    parser.add_argument("--bits", type=int, default=64, help="code length (default 64)")
    parser.add_argument("--shards", type=int, default=8, help="shards of the sharded index (default 8)")
    parser.add_argument("--nq", type=int, default=100, help="queries (default 100)")
    parser.add_argument("--k", type=int, default=10, help="neighbours (default 10)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row (default 5)")
    args = parser.parse_args()
    exit_without_extra("parquet", "pyarrow")
    from cmhash import HashIndex
    from cmhash import parquet as cp
    from cmhash.codefiles import load_codes
    from cmhash.sharded import ShardedIndex

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (args.n, args.bits // 8), dtype=np.uint8)
    ids = np.arange(args.n, dtype=np.int64)
    names = [f"photos/{i:08d}.jpg" for i in range(args.n)]
    queries = codes[rng.integers(0, args.n, args.nq)]
    print(f"{args.n:,} random {args.bits}-bit codes, {args.shards} shards, {args.nq} queries, k={args.k}; "
          f"CPU: {cpu_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        buffer = io.BytesIO()
        np.savez(buffer, codes=codes, ids=ids, names=np.asarray(names), bundle_fingerprint=np.asarray("x"))
        (tmp / "codes.npz").write_bytes(buffer.getvalue())
        cp.write_table(cp.codes_table(ids, codes, names, bundle_fingerprint="x"), tmp / "codes.parquet")
        npz_best, npz_med, a = timed(lambda: load_codes(tmp / "codes.npz"), args.repeat)
        pq_best, pq_med, b = timed(lambda: load_codes(tmp / "codes.parquet"), args.repeat)
        assert np.array_equal(a.codes, b.codes) and np.array_equal(a.ids, b.ids) and a.names == b.names
        print(f"read codes, ids, names: codes.npz {npz_best:.3f} s (median {npz_med:.3f}), "
              f"codes.parquet {pq_best:.3f} s (median {pq_med:.3f}); parquet/npz {pq_best / npz_best:.2f}x")

        one = HashIndex(args.bits)
        one.add(codes, ids)
        one.save(tmp / "one.cmhidx")
        (tmp / "shards").mkdir()
        for s, rows in enumerate(np.array_split(np.arange(args.n), args.shards)):
            shard = HashIndex(args.bits)
            shard.add(codes[rows], ids[rows])
            shard.save(tmp / "shards" / f"s{s:03d}.cmhidx")
        single = HashIndex.load(tmp / "one.cmhidx", mmap=True)
        sharded = ShardedIndex.open(tmp / "shards")
        one_best, one_med, r1 = timed(lambda: single.search(queries, args.k), args.repeat)
        sh_best, sh_med, r2 = timed(lambda: sharded.search(queries, args.k), args.repeat)
        assert np.array_equal(r1[0], r2[0]) and np.array_equal(r1[1], r2[1]), "sharded results differ"
        print(f"kNN search: one index {one_best * 1e3:.1f} ms (median {one_med * 1e3:.1f}), "
              f"{args.shards} shards {sh_best * 1e3:.1f} ms (median {sh_med * 1e3:.1f}); "
              f"sharded/one {sh_best / one_best:.2f}x; results identical")


if __name__ == "__main__":
    main()
