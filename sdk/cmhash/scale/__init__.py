"""cmhash on existing cluster engines: Ray Data and Spark encode collections into Parquet
codes parts, and Ray serves a sharded search. Nothing here schedules work itself.

- :class:`HashBatches` - a callable class for ``ray.data.Dataset.map_batches``: one
  :class:`~cmhash.encoder.Encoder` per actor, a batch of image bytes, paths or texts in,
  one row per item out (``id``, ``name``, ``code``, ``reason``).
- :func:`encode_with_ray` - ``cmhash encode --engine ray``: a folder, file list, manifest or
  Parquet input, resumable Parquet parts out (local paths or fsspec URLs).
- :func:`spark_hasher` - a function for ``DataFrame.mapInPandas`` (image-bytes or text
  column in, fixed-size binary code column out), one Encoder per Python worker.
- :class:`RayShardedSearch` - one Ray actor per shard of a sharded index, queries fanned
  out, top-k merged exactly; a shard that dies is restarted from its file.

Ray, Spark, pyarrow and fsspec are optional extras (``pip install "cmhash-sdk[ray]"``,
``[spark]`` or ``[scale]``); each is imported only when its function runs.
"""

from __future__ import annotations

_EXPORTS = {
    "HashBatches": "ray_encode",
    "encode_with_ray": "ray_encode",
    "spark_hasher": "spark",
    "spark_code_schema": "spark",
    "RayShardedSearch": "ray_search",
    "process_encoder": "batches",
    "hash_items": "batches",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
