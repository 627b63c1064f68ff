"""Encoding on Spark: a function for ``DataFrame.mapInPandas``.

    from cmhash.scale import spark_code_schema, spark_hasher

    photos = spark.read.format("binaryFile").option("pathGlobFilter", "*.jpg").load("s3a://bucket/photos/")
    codes = photos.mapInPandas(spark_hasher("/opt/bundle", column="content"),
                               schema=spark_code_schema(photos.schema, "content"))
    codes.write.parquet("s3a://bucket/codes/")

Each output row is its input row without the items column, plus ``code`` (binary, bits/8
bytes; null for an item that could not be encoded) and ``reason`` (null, or why not). The
bundle is loaded once per Python worker (:func:`~cmhash.scale.batches.process_encoder`), so
give a path every worker can read (a shared filesystem, or ``SparkContext.addFile`` and
``SparkFiles.get``), or a loaded :class:`~cmhash.bundle.Bundle`, which travels inside the function.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from .batches import hash_items, process_encoder

CODE_COLUMN = "code"
REASON_COLUMN = "reason"


def spark_hasher(bundle, *, column: str, modality: str | None = None, variant: str = "fp32", backend: str = "auto",
                 threads: int | None = None, batch_size: int = 32) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """A function for ``DataFrame.mapInPandas`` that hashes ``column``: image bytes (the
    ``content`` column of Spark's ``binaryFile`` source), image paths, or texts (with
    ``modality="text"``). onnxruntime runs ``threads`` intra-op threads (default: the task's
    CPUs, ``spark.task.cpus``). Use it with :func:`spark_code_schema`."""

    def hash_partition(frames):
        import pandas as pd

        encoder = process_encoder(bundle, variant=variant, backend=backend, threads=threads or _task_cpus())
        chosen = modality or ("image" if "image" in encoder.modalities else "text")
        for frame in frames:
            items = frame[column].tolist()
            positions = list(range(len(items)))
            codes, hashed, errors = hash_items(encoder, chosen, positions, items, batch_size=batch_size)
            code = [None] * len(items)
            for position, row in zip(hashed, codes):
                code[position] = row.tobytes()
            reason = [None] * len(items)
            for error in errors:
                reason[error["id"]] = error["reason"]
            out = frame.drop(columns=[column])
            out[CODE_COLUMN] = pd.Series(code, index=frame.index, dtype=object)
            out[REASON_COLUMN] = pd.Series(reason, index=frame.index, dtype=object)
            yield out

    return hash_partition


def spark_code_schema(input_schema, column: str):
    """The output schema of :func:`spark_hasher`'s function: ``input_schema`` without
    ``column``, plus ``code`` (binary) and ``reason`` (string)."""
    from pyspark.sql.types import BinaryType, StringType, StructField, StructType

    kept = [f for f in input_schema.fields if f.name != column]
    return StructType(kept + [StructField(CODE_COLUMN, BinaryType(), True), StructField(REASON_COLUMN, StringType(), True)])


def _task_cpus() -> int:
    try:
        from pyspark import TaskContext

        context = TaskContext.get()
        return max(1, int(context.cpus())) if context is not None else 1
    except (ImportError, AttributeError):
        return 1
