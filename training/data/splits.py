"""Query / database / training splits in the papers' protocol.

GCDH (the code EGATH is built from) draws one permutation with NumPy's legacy
``RandomState(seed)``; the first ``query`` indices are the queries, the rest the
retrieval database, and the training set is the first ``train`` of the database, so
training samples are also retrievable. With the presets' sizes and seeds (the
papers' protocol) the indices equal GCDH's wherever the collection has exactly query + database
samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class SplitSizes:
    query: int
    train: int
    database: int | None = None  # None: every sample that is not a query
    seed: int = 0


# The papers' protocol: query / training / database sizes and the split seeds.
SPLIT_PRESETS = {
    "mirflickr25k": SplitSizes(query=2000, train=10000, database=18015, seed=6),
    "nuswide10": SplitSizes(query=2100, train=10500, database=184477, seed=7),
    "mscoco": SplitSizes(query=5000, train=10000, database=117218, seed=8),
}


@dataclass(frozen=True)
class Split:
    query: np.ndarray
    database: np.ndarray
    train: np.ndarray
    sizes: SplitSizes

    def describe(self) -> dict:
        return {**asdict(self.sizes), "n_query": len(self.query), "n_database": len(self.database),
                "n_train": len(self.train)}


def split_sizes(preset_or_sizes: str | SplitSizes | dict) -> SplitSizes:
    if isinstance(preset_or_sizes, SplitSizes):
        return preset_or_sizes
    if isinstance(preset_or_sizes, dict):
        return SplitSizes(**preset_or_sizes)
    if preset_or_sizes not in SPLIT_PRESETS:
        raise DataError(f"unknown split preset {preset_or_sizes!r}; available: {sorted(SPLIT_PRESETS)}")
    return SPLIT_PRESETS[preset_or_sizes]


def make_split(n: int, sizes: str | SplitSizes | dict) -> Split:
    """Split ``n`` samples; ``sizes`` is a preset name, a :class:`SplitSizes` or its dict."""
    sizes = split_sizes(sizes)
    database = n - sizes.query if sizes.database is None else sizes.database
    if min(sizes.query, sizes.train, database) < 1:
        raise DataError(f"split sizes must be positive: query={sizes.query} train={sizes.train} database={database}")
    if sizes.query + database > n:
        raise DataError(f"the split needs query {sizes.query} + database {database} = {sizes.query + database} "
                        f"samples, the data has {n}")
    if sizes.train > database:
        raise DataError(f"the training set ({sizes.train}) is drawn from the database ({database}) and cannot be larger")
    # permutation of exactly query + database when that is all the data, as GCDH does
    perm = np.random.RandomState(sizes.seed).permutation(n)[: sizes.query + database]
    query = perm[: sizes.query]
    db = perm[sizes.query :]
    return Split(query=query, database=db, train=db[: sizes.train], sizes=sizes)
