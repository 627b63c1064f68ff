import numpy as np
import pytest

from cmhash.training.data import SPLIT_PRESETS, make_split
from cmhash.training.errors import DataError


@pytest.mark.parametrize("preset,n", [("mirflickr25k", 20015), ("nuswide10", 186577), ("mscoco", 122218)])
def test_paper_presets(preset, n):
    split = make_split(n, preset)
    sizes = SPLIT_PRESETS[preset]
    assert (len(split.query), len(split.database), len(split.train)) == (sizes.query, sizes.database, sizes.train)
    assert not set(split.query) & set(split.database)
    assert set(split.train) <= set(split.database)  # training samples are retrievable too
    assert len(set(split.query) | set(split.database)) == n


def test_gcdh_permutation_order():
    # GCDH: perm = RandomState(seed).permutation(query + database); query first, train = start of database
    perm = np.random.RandomState(6).permutation(20015)
    split = make_split(20015, "mirflickr25k")
    np.testing.assert_array_equal(split.query, perm[:2000])
    np.testing.assert_array_equal(split.train, perm[2000:12000])


def test_custom_sizes_deterministic_and_seeded():
    a = make_split(300, {"query": 50, "train": 100, "seed": 3})
    b = make_split(300, {"query": 50, "train": 100, "seed": 3})
    c = make_split(300, {"query": 50, "train": 100, "seed": 4})
    np.testing.assert_array_equal(a.query, b.query)
    np.testing.assert_array_equal(a.train, b.train)
    assert not np.array_equal(a.query, c.query)
    assert len(a.database) == 250 and a.describe()["n_train"] == 100


def test_impossible_sizes():
    with pytest.raises(DataError, match="needs query"):
        make_split(100, {"query": 50, "train": 10, "database": 60})
    with pytest.raises(DataError, match="cannot be larger"):
        make_split(100, {"query": 50, "train": 60})
    with pytest.raises(DataError, match="available"):
        make_split(100, "cifar")
