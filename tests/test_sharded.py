"""ShardedIndex: results equal one HashIndex over the shards' union (ties and duplicate codes
included), shards from folders, JSON lists and Parquet, and the CLI on sharded indexes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmhash import HashIndex
from cmhash.cli import main
from cmhash.errors import CodeFormatError, IndexFileError, InvalidArgumentError
from cmhash.sharded import ShardedIndex, merge_range_results, merge_results


def _shards(sizes, bits=16, seed=0):
    """Shards of few distinct codes (many ties, many duplicate codes across shards), unique ids."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (12, bits // 8), dtype=np.uint8)
    ids = rng.permutation(10 * sum(sizes))[: sum(sizes)]
    out, start = [], 0
    for size in sizes:
        shard = HashIndex(bits)
        shard.add(pool[rng.integers(0, len(pool), size)], ids[start : start + size])
        out.append(shard)
        start += size
    return out, pool


def _union(shards):
    one = HashIndex(shards[0].bits)
    for s in shards:
        one.add(s.codes, s.ids)
    return one


@pytest.mark.parametrize("sizes", [[30, 0, 17, 45], [5], [1, 1, 1]])
def test_search_equals_one_index_over_the_union(sizes):
    shards, pool = _shards(sizes)
    sharded, one = ShardedIndex(shards), _union(shards)
    rng = np.random.default_rng(1)
    queries = np.concatenate([pool[:4], rng.integers(0, 256, (4, 2), dtype=np.uint8)])
    for k in (1, 3, 10, sum(sizes), sum(sizes) + 5):
        got, want = sharded.search(queries, k), one.search(queries, k)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])  # ties in the same order: shard, then position
    for radius in (0, 2, 7, 16):
        for got, want in zip(sharded.range_search(queries, radius), one.range_search(queries, radius)):
            np.testing.assert_array_equal(got, want)
    assert len(sharded) == len(one) == sum(sizes)


def test_ties_go_by_shard_then_position():
    c, d, e = np.array([[0b1010, 1]], np.uint8), np.array([[0b1011, 1]], np.uint8), np.array([[255, 0]], np.uint8)
    a, b = HashIndex(16), HashIndex(16)
    a.add(np.concatenate([c, d, c]), [7, 3, 5])
    b.add(np.concatenate([e, c, c]), [1, 9, 2])
    dist, ids = ShardedIndex([a, b]).search(c, 6)
    assert dist.tolist() == [[0, 0, 0, 0, 1, 7]]
    assert ids.tolist() == [[7, 5, 9, 2, 3, 1]]
    dist, ids = ShardedIndex([b, a]).search(c, 4)
    assert ids.tolist() == [[9, 2, 7, 5]]
    lims, dist, ids = ShardedIndex([a, b]).range_search(c, 1)
    assert lims.tolist() == [0, 5] and ids.tolist() == [7, 5, 9, 2, 3] and dist.tolist() == [0, 0, 0, 0, 1]


def test_merge_results_is_what_a_service_reuses():
    shards, pool = _shards([10, 14, 9])
    parts = [s.search(pool[:3], 6) for s in shards]
    np.testing.assert_array_equal(merge_results(parts, 6)[1], _union(shards).search(pool[:3], 6)[1])
    ranges = [s.range_search(pool[:3], 4) for s in shards]
    for got, want in zip(merge_range_results(ranges), _union(shards).range_search(pool[:3], 4)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(InvalidArgumentError):
        merge_results([], 3)
    with pytest.raises(InvalidArgumentError):
        merge_results([(np.zeros((2, 3)), np.zeros((3, 3)))], 3)


def test_open_folder_json_list_and_parquet(tmp_path):
    shards, pool = _shards([8, 0, 11, 6])
    for i, s in enumerate(shards[:3]):
        s.save(tmp_path / f"s{i}.cmhidx")
    pa_ok = True
    try:
        from cmhash import parquet as cp

        cp.write_table(cp.codes_table(shards[3].ids, shards[3].codes), tmp_path / "s3.parquet")
    except ImportError:
        pa_ok = False
        shards[3].save(tmp_path / "s3.cmhidx")
    (tmp_path / "notes.txt").write_text("not a shard")
    one = _union(shards)
    from_folder = ShardedIndex.open(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in from_folder.paths] == ["s0.cmhidx", "s1.cmhidx", "s2.cmhidx",
                                                               "s3.parquet" if pa_ok else "s3.cmhidx"]
    assert from_folder.shards[0]._mapped  # index files are memory-mapped
    np.testing.assert_array_equal(from_folder.search(pool, 9)[1], one.search(pool, 9)[1])
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps({"format": "cmhash-shards/1", "shards": [p.rsplit("/", 1)[1] for p in from_folder.paths]}))
    np.testing.assert_array_equal(ShardedIndex.open(listing).search(pool, 9)[1], one.search(pool, 9)[1])
    # the CLI takes the same forms
    np.save(tmp_path / "q.npy", pool[:2])
    assert main(["index", "info", str(tmp_path), "--json"]) == 0
    for where in (tmp_path, listing):
        assert main(["search", str(where), str(tmp_path / "q.npy"), "-k", "4", "--json"]) == 0


def test_search_cli_output(tmp_path, capsys):
    shards, pool = _shards([6, 7])
    for i, s in enumerate(shards):
        s.save(tmp_path / f"p{i}.cmhidx")
    np.save(tmp_path / "q.npy", pool[:2])
    capsys.readouterr()
    assert main(["search", str(tmp_path), str(tmp_path / "q.npy"), "-k", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ids"] == _union(shards).search(pool[:2], 4)[1].tolist()


def test_refusals(tmp_path):
    a, _ = _shards([3], bits=16)
    b, _ = _shards([3], bits=32, seed=5)
    with pytest.raises(CodeFormatError, match="16-bit"):
        ShardedIndex([a[0], b[0]])
    twin = HashIndex(16)
    twin.add(a[0].codes, a[0].ids)
    with pytest.raises(InvalidArgumentError, match="several shards"):
        ShardedIndex([a[0], twin])
    assert len(ShardedIndex([a[0], twin], check_ids=False)) == 6
    with pytest.raises(InvalidArgumentError):
        ShardedIndex([])
    (tmp_path / "bad.json").write_text('{"shards": "a"}')
    with pytest.raises(IndexFileError, match="shard list"):
        ShardedIndex.open(tmp_path / "bad.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexFileError, match="no .cmhidx"):
        ShardedIndex.open(tmp_path / "empty")
