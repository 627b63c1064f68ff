"""The sharded search served by Ray (a real local cluster): answers equal to ShardedIndex's
and one HashIndex's over the same codes, and a shard actor killed before or during a query
is started again from its file without changing the answer."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
pytest.importorskip("pyarrow")

from cmhash.errors import InvalidArgumentError, ShardUnavailableError  # noqa: E402
from cmhash.index import HashIndex  # noqa: E402
from cmhash.parquet import codes_table, write_table  # noqa: E402
from cmhash.scale import RayShardedSearch  # noqa: E402
from cmhash.sharded import ShardedIndex  # noqa: E402

BITS = 64


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of 64-bit codes, two index files and one Parquet file, with many
    duplicate codes across shards (ties decided by shard order); and all the codes."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (300, BITS // 8), dtype=np.uint8)
    codes = np.concatenate([base, base[:150], rng.integers(0, 256, (450, BITS // 8), dtype=np.uint8)])
    ids = rng.permutation(10_000)[: len(codes)].astype(np.int64)
    bounds = [0, 320, 600, len(codes)]
    for s in range(3):
        part_codes, part_ids = codes[bounds[s] : bounds[s + 1]], ids[bounds[s] : bounds[s + 1]]
        if s == 1:
            write_table(codes_table(part_ids, part_codes, bits=BITS), root / f"s{s}.parquet")
        else:
            index = HashIndex(BITS)
            index.add(part_codes, part_ids)
            index.save(root / f"s{s}.cmhidx")
    return root, codes, ids


def test_answers_equal_the_local_sharded_index_and_one_index(shards):
    root, codes, ids = shards
    queries = np.concatenate([codes[:20], np.random.default_rng(1).integers(0, 256, (20, BITS // 8), dtype=np.uint8)])
    one = HashIndex(BITS)
    one.add(codes, ids)
    with RayShardedSearch(root, cpus_per_shard=0.5) as served:
        assert len(served) == len(codes) and served.bits == BITS
        for k in (1, 10, 1200):
            got = served.search(queries, k)
            want = ShardedIndex.open(root).search(queries, k)
            assert all(np.array_equal(g, w) for g, w in zip(got, want))
            assert all(np.array_equal(g, w) for g, w in zip(got, one.search(queries, k)))
        got = served.range_search(queries, 20)
        assert all(np.array_equal(g, w) for g, w in zip(got, one.range_search(queries, 20)))


def test_a_killed_shard_is_restarted_from_its_file(shards):
    root, codes, ids = shards
    queries = np.random.default_rng(2).integers(0, 256, (4000, BITS // 8), dtype=np.uint8)
    want = ShardedIndex.open(root).search(queries, 5)
    with RayShardedSearch(root, cpus_per_shard=0.5, retries=1) as served:
        ray.kill(served.actors[1])  # dead before the query
        assert all(np.array_equal(g, w) for g, w in zip(served.search(queries, 5), want))
        assert served.restarts == 1

        answers = []
        searching = threading.Thread(target=lambda: answers.append(served.search(queries, 5)))
        victim = served.actors[2]
        searching.start()
        time.sleep(0.02)  # the query is out: kill a shard while it answers
        ray.kill(victim)
        searching.join(60)
        assert answers and all(np.array_equal(g, w) for g, w in zip(answers[0], want))
        # the kill may land after shard 2 answered; the next query then meets the dead actor
        assert all(np.array_equal(g, w) for g, w in zip(served.search(queries, 5), want))
        assert served.restarts == 2


def test_a_shard_that_keeps_dying_is_an_error_and_ids_must_be_unique(shards, tmp_path):
    root, codes, ids = shards
    with RayShardedSearch(root, cpus_per_shard=0.5, retries=0) as served:
        ray.kill(served.actors[0])
        with pytest.raises(ShardUnavailableError, match="s0.cmhidx"):
            served.search(codes[:2], 3)
    index = HashIndex(BITS)
    index.add(codes[:5], ids[:5])
    index.save(tmp_path / "again.cmhidx")
    with pytest.raises(InvalidArgumentError, match="unique"):
        RayShardedSearch([root / "s0.cmhidx", tmp_path / "again.cmhidx"], cpus_per_shard=0.5)
