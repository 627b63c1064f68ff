"""A sharded index served by Ray: one actor per shard, queries fanned out, answers merged.

    search = RayShardedSearch("shards/")          # as ShardedIndex.open takes: folder, list, .json
    dist, ids = search.search(queries, k=10)      # what ShardedIndex (and one HashIndex) returns

Each actor opens its shard file itself (an index file, memory-mapped, or Parquet codes), so
the files must be readable where the actors run (a shared filesystem, or one node). Results
are merged with :func:`cmhash.sharded.merge_results`, so they are exactly those of
:class:`~cmhash.sharded.ShardedIndex` over the same files. A shard whose actor dies (a node
lost, a kill) is started again from its file and its part of the query asked again, up to
``retries`` times per query.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CmhashError, CodeFormatError, InvalidArgumentError, ShardUnavailableError
from ..sharded import merge_range_results, merge_results, shard_paths


class _Shard:
    """The actor of one shard (made a Ray actor class when first used)."""

    def __init__(self, path: str, mmap: bool, threads: int):
        from ..sharded import ShardedIndex

        self.index = ShardedIndex.open([path], mmap=mmap, check_ids=False)
        self.threads = threads

    def describe(self, with_ids: bool):
        return self.index.bits, len(self.index), (self.index.shards[0].ids if with_ids else None)

    def search(self, queries, k: int):
        return self.index.search_shard(0, queries, k, self.threads)

    def range_search(self, queries, radius: int):
        return self.index.range_search_shard(0, queries, radius, self.threads)


class RayShardedSearch:
    """Exact kNN and range search over shard files, one Ray actor per shard.

    Args:
        shards: what :func:`cmhash.sharded.shard_paths` takes (a folder, a ``.json`` shard
            list, a list of paths).
        cpus_per_shard: each actor's CPUs (a fraction lets more shards than CPUs share a
            node: an actor that cannot be placed waits), and its search threads (at least 1).
        retries: how often one query may restart a dead shard.
        check_ids: refuse ids that occur in two shards (as :class:`ShardedIndex` does).

    Connect to the cluster (``ray.init``) first; :meth:`close` ends the actors.
    """

    def __init__(self, shards: Any, *, cpus_per_shard: float = 1, retries: int = 2, mmap: bool = True,
                 check_ids: bool = True):
        import ray

        if not ray.is_initialized():
            raise CmhashError("RayShardedSearch needs a Ray connection: call ray.init() (or ray.init(address=...)) first")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgumentError(f"retries must be an int >= 0, got {retries!r}")
        self.paths = shard_paths(shards)
        self.retries = retries
        self.restarts = 0  # shards started again after their actor died
        self._options = {"num_cpus": cpus_per_shard}
        self._threads = max(1, int(cpus_per_shard))
        self._mmap = mmap
        self._actor_class = ray.remote(_Shard)
        self.actors = [self._start(path) for path in self.paths]
        described = ray.get([a.describe.remote(check_ids) for a in self.actors])
        self.bits = described[0][0]
        for path, (bits, _, _) in zip(self.paths, described):
            if bits != self.bits:
                raise CodeFormatError(f"RayShardedSearch: {self.paths[0]} holds {self.bits}-bit codes but {path} holds "
                                      f"{bits}-bit codes; all shards must come from one code space")
        self.sizes = [n for _, n, _ in described]
        if check_ids and len(described) > 1:
            ids = np.concatenate([i for _, _, i in described])
            if len(np.unique(ids)) != len(ids):
                raise InvalidArgumentError("RayShardedSearch: an id is in several shards; ids must be unique across "
                                           "shards, as in one index")

    def _start(self, path: str):
        return self._actor_class.options(**self._options).remote(path, self._mmap, self._threads)

    def __len__(self) -> int:
        return sum(self.sizes)

    def search(self, queries, k: int):
        """The k nearest codes over all shards: ``(distances, ids)`` as ``HashIndex.search``."""
        return merge_results(self._fan_out("search", queries, k), k)

    def range_search(self, queries, radius: int):
        """Every code within ``radius``: ``(lims, distances, ids)`` as ``HashIndex.range_search``."""
        return merge_range_results(self._fan_out("range_search", queries, radius))

    def _fan_out(self, method: str, queries, arg) -> list:
        """Every shard's answer, in shard order; a shard whose actor died is restarted and asked again."""
        import ray
        from ray.exceptions import RayActorError

        queries = ray.put(np.ascontiguousarray(queries))
        pending = {i: getattr(actor, method).remote(queries, arg) for i, actor in enumerate(self.actors)}
        answers: dict[int, Any] = {}
        tries = {i: 0 for i in pending}
        while pending:
            i, ref = next(iter(pending.items()))
            del pending[i]
            try:
                answers[i] = ray.get(ref)
            except RayActorError as exc:
                tries[i] += 1
                if tries[i] > self.retries:
                    raise ShardUnavailableError(f"shard {self.paths[i]} died {tries[i]} times during one query; "
                                                f"last: {exc}") from exc
                ray.kill(self.actors[i])  # make sure the old one is gone before its file is opened again
                self.actors[i] = self._start(self.paths[i])
                self.restarts += 1
                pending[i] = getattr(self.actors[i], method).remote(queries, arg)
        return [answers[i] for i in range(len(self.actors))]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "RayShardedSearch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
