"""Throughput of encoding on Ray and on Spark against ``cmhash encode``, on the same photos,
bundle and CPUs, in one run; and the latency of the sharded search served by Ray against one
local index.

    python examples/bench_scale.py BUNDLE [--photos DIR] [--items 512] [--cpus 2]
                                   [--engines local,ray,spark] [--search]

Prints items/s per engine and its ratio to ``cmhash encode`` (goal: Ray within 15 %), the
per-item cost split into decode and model on one core (what bounds a machine, hence N
machines), and with ``--search`` the search latency per query and per batch. The engines'
start-up (``ray.init``, the Spark session) is outside the timings; the actors' bundle loading
is inside, as a job pays it. Needs the scale extra (``pip install "cmhash-sdk[scale]"``) and
Java for Spark.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cmhash.cli import exit_without_extra
from cmhash.cpus import cpu_name

ROOT = Path(__file__).resolve().parents[1]
# the test data's photos ($CMHASH_TEST_DATA, else shared/data beside the checkout)
DEFAULT_PHOTOS = Path(os.environ.get("CMHASH_TEST_DATA") or ROOT.parent / "shared" / "data") / "mirflickr-mini" / "images"


def photo_folder(source: Path, items: int, tmp: Path) -> Path:
    photos = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        sys.exit(f"error: no photos in {source}; pass --photos DIR")
    folder = tmp / "photos"
    folder.mkdir()
    for i in range(items):  # repeat the photos when asked for more than there are
        shutil.copy(photos[i % len(photos)], folder / f"{i:06d}{photos[i % len(photos)].suffix}")
    return folder


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bench_encoding(args, folder: Path, tmp: Path) -> None:
    from cmhash.encoder import Encoder
    from cmhash.offline import encode_collection

    n, m = args.items, args.items // 8
    small = tmp / "small"
    small.mkdir()
    for path in sorted(folder.iterdir())[:m]:
        shutil.copy(path, small / path.name)
    rates, steady = {}, {}

    def measure(name, job):
        """End to end rate of the whole job, and the steady rate: the extra items of the
        whole job over its extra time against a job of n/8 items (the fixed costs of starting
        workers and loading the bundle cancel out)."""
        whole = timed(lambda: job(folder, "whole"))
        part = timed(lambda: job(small, "small"))
        rates[name], steady[name] = n / whole, (n - m) / (whole - part)

    measure("cmhash encode", lambda source, out: encode_collection(
        args.bundle, source, tmp / f"local-{out}", workers=args.cpus, threads=args.cpus, batch_size=args.batch_size,
        chunk_size=args.chunk_size))
    if "ray" in args.engines:
        import ray

        from cmhash.scale import encode_with_ray

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024**2)
        ray.data.DataContext.get_current().enable_progress_bars = False
        measure("ray (encode_with_ray)", lambda source, out: encode_with_ray(
            args.bundle, source, tmp / f"ray-{out}", actors=args.cpus, cpus_per_actor=1, batch_size=args.batch_size,
            chunk_size=args.chunk_size))
        ray.shutdown()
    if "spark" in args.engines:
        from pyspark.sql import SparkSession

        from cmhash.scale import spark_code_schema, spark_hasher

        os.environ["PYSPARK_PYTHON"] = sys.executable
        spark = (SparkSession.builder.master(f"local[{args.cpus}]").config("spark.ui.enabled", "false")
                 .config("spark.driver.memory", "1g").config("spark.ui.showConsoleProgress", "false").getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
        df = spark.read.format("binaryFile").load(str(folder)).repartition(args.cpus * 2)
        codes = df.mapInPandas(spark_hasher(str(Path(args.bundle).resolve()), column="content",
                                            batch_size=args.batch_size), schema=spark_code_schema(df.schema, "content"))
        codes.select("reason").collect()  # the Python workers start and load the bundle, untimed
        seconds = timed(lambda: codes.write.mode("overwrite").parquet(str(tmp / "spark")))
        rates["spark (mapInPandas)"] = n / seconds
        spark.stop()

    base = rates["cmhash encode"]
    print(f"\nencoding {n} photos, {args.cpus} CPUs ({cpu_name()}; loaded machine unless said otherwise)")
    print(f"  {'':24s} {'end to end':>20s}   {'steady (workers up)':>28s}")
    for name, rate in rates.items():
        line = f"  {name:24s} {rate:8.1f} items/s {rate / base:5.2f}x"
        if name in steady:
            line += f"   {steady[name]:8.1f} items/s {steady[name] / steady['cmhash encode']:5.2f}x"
        print(line)
    print("  (ratios against cmhash encode; spark's timing starts with its workers up: its one figure is steady)")

    # what bounds one machine: decode (JPEG, resize) against the model, per item on one core
    encoder = Encoder.load(args.bundle, threads=1)
    paths = sorted(folder.iterdir())[: min(n, 128)]
    decode = timed(lambda: [encoder.preprocessor.pixels(p) for p in paths]) / len(paths)
    pixels = np.stack([encoder.preprocessor.pixels(p) for p in paths[: args.batch_size]])
    model = min(timed(lambda: encoder.hash_preprocessed("image", pixels)) for _ in range(3)) / len(pixels)
    print(f"  per item on one core: decode {decode * 1e3:.2f} ms, model {model * 1e3:.2f} ms "
          f"-> at most {1 / (decode + model):.0f} items/s per core before storage")


def bench_search(args) -> None:
    import ray

    from cmhash.index import HashIndex
    from cmhash.scale import RayShardedSearch
    from cmhash.sharded import ShardedIndex

    rng = np.random.default_rng(0)
    bits, per_shard = 64, args.codes // args.shards
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(args.shards):
            index = HashIndex(bits)
            index.add(rng.integers(0, 256, (per_shard, bits // 8), dtype=np.uint8),
                      np.arange(s * per_shard, (s + 1) * per_shard))
            index.save(Path(tmp) / f"s{s}.cmhidx")
        local = ShardedIndex.open(tmp)
        queries = rng.integers(0, 256, (args.batch_queries, bits // 8), dtype=np.uint8)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
        served = RayShardedSearch(tmp, cpus_per_shard=args.cpus / args.shards)
        one = [[], []]
        for q in queries[:50]:
            one[0].append(timed(lambda: local.search(q[None], 10)))
            one[1].append(timed(lambda: served.search(q[None], 10)))
        batch = [min(timed(lambda: local.search(queries, 10)) for _ in range(3)),
                 min(timed(lambda: served.search(queries, 10)) for _ in range(3))]
        assert all(np.array_equal(a, b) for a, b in zip(local.search(queries, 10), served.search(queries, 10)))
        served.close()
        ray.shutdown()
    print(f"\nsharded search, {args.shards} shards x {per_shard:,} codes of {bits} bits, k=10, {args.cpus} CPUs "
          f"({cpu_name()}; loaded machine unless said otherwise); results equal")
    q_local, q_ray = statistics.median(one[0]) * 1e3, statistics.median(one[1]) * 1e3
    print(f"  one query:  local {q_local:7.2f} ms   ray {q_ray:7.2f} ms   overhead {q_ray - q_local:+.2f} ms")
    print(f"  {args.batch_queries} queries: local {batch[0] * 1e3:7.1f} ms   ray {batch[1] * 1e3:7.1f} ms   "
          f"overhead {(batch[1] - batch[0]) * 1e3:+.1f} ms ({batch[1] / batch[0]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="a bundle folder (cmhash export, or cmhash demo)")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="a folder of photos")
    parser.add_argument("--items", type=int, default=1024, help="photos to encode (repeated when fewer); the steady "
                        "rate also times a job of items/8")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs every engine gets")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=64, help="items per Ray part")
    parser.add_argument("--engines", default="local,ray,spark", help="comma-separated: ray, spark (local always runs)")
    parser.add_argument("--search", action="store_true", help="also time the sharded search on Ray")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--codes", type=int, default=400_000, help="codes over all shards")
    parser.add_argument("--batch-queries", type=int, default=1000)
    args = parser.parse_args()
    args.engines = {e.strip() for e in args.engines.split(",") if e.strip()}
    unknown = args.engines - {"local", "ray", "spark"}
    if unknown:
        parser.error(f"--engines: unknown {', '.join(sorted(unknown))}")
    if "ray" in args.engines or args.search:
        exit_without_extra("ray", "ray", "pyarrow", "fsspec")
    if "spark" in args.engines:
        exit_without_extra("spark", "pyspark", "pandas", "pyarrow")
    with tempfile.TemporaryDirectory() as tmp:
        folder = photo_folder(args.photos, args.items, Path(tmp))
        bench_encoding(args, folder, Path(tmp))
    if args.search:
        bench_search(args)


if __name__ == "__main__":
    main()
