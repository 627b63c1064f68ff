"""What every engine's batch function shares: one Encoder per process, and items (image
bytes, paths or URLs, or texts) -> codes and error rows through
:func:`cmhash.offline.encode_records`, the same per-item preparation as ``cmhash encode``."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from ..inputs import Record
from ..offline import encode_records

_ENCODERS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def process_encoder(bundle, *, variant: str = "fp32", backend: str = "auto", device: str = "cpu",
                    threads: int | None = None):
    """The Encoder of ``bundle`` (a path or a loaded :class:`~cmhash.bundle.Bundle`) for this
    process, loaded on first use and kept: Spark calls its function once per partition, and
    a bundle loads in seconds, so each Python worker loads it once."""
    from ..bundle import Bundle
    from ..encoder import Encoder

    name = bundle.fingerprint if isinstance(bundle, Bundle) else os.fspath(bundle)
    key = (name, variant, backend, device, threads)
    with _LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = Encoder.load(bundle, backend=backend, device=device, threads=threads, variant=variant)
        return _ENCODERS[key]


def is_url(item: Any) -> bool:
    return isinstance(item, str) and "://" in item and not item.startswith("file://")


def _fetched(record: Record) -> Record:
    """A record whose image is an fsspec URL, with the URL's bytes instead (or its problem)."""
    if not is_url(record.image):
        return record
    import fsspec

    try:
        with fsspec.open(record.image, "rb") as f:
            return Record(record.number, record.name, image=f.read())
    except (OSError, ValueError) as exc:
        return Record(record.number, record.name, problem=f"{type(exc).__name__}: {exc}")


def hash_items(encoder, modality: str, ids: Sequence[int], items: Sequence[Any], names: Sequence[str] | None = None, *,
               batch_size: int = 32, workers: int = 1):
    """Items -> (codes (n, bits/8) uint8, ids hashed, error rows ``{"id", "item", "reason"}``).

    An image item is encoded bytes, a local path or an fsspec URL; a text item is a string.
    A missing item (None) or one that cannot be read or decoded becomes an error row."""
    records = []
    for number, item, name in zip(ids, items, names if names is not None else [None] * len(ids)):
        number = int(number)
        if isinstance(item, (bytes, bytearray, memoryview)):
            item = bytes(item)
        label = str(name) if name is not None else (item if isinstance(item, str) and modality == "image" else f"id {number}")
        if item is None or (isinstance(item, float) and item != item):  # None, or NaN from a pandas batch
            records.append(Record(number, label, problem=f"no {modality} (the value is missing)"))
        elif modality == "image":
            records.append(Record(number, label, image=item))
        elif isinstance(item, bytes):
            try:
                records.append(Record(number, label, text=item.decode("utf-8")))
            except UnicodeDecodeError as exc:
                records.append(Record(number, label, problem=f"not UTF-8 text ({exc.reason} at byte {exc.start})"))
        else:
            records.append(Record(number, label, text=str(item)))
    return encode_prepared(encoder, modality, records, batch_size=batch_size, workers=workers)


def encode_prepared(encoder, modality: str, records: list[Record], *, batch_size: int, workers: int):
    """:func:`cmhash.offline.encode_records` on records whose images may be URLs, decoding
    on ``workers`` threads."""
    if workers <= 1:
        return encode_records(encoder, modality, [_fetched(r) for r in records], batch_size)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cmhash-decode") as pool:
        return encode_records(encoder, modality, list(pool.map(_fetched, records)), batch_size, pool)


def as_columns(batch: Any) -> dict[str, list]:
    """A batch as Ray or pandas hands it (dict of arrays, pyarrow Table, DataFrame) -> columns as lists."""
    if hasattr(batch, "to_pydict"):
        return batch.to_pydict()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):
        return {c: batch[c].tolist() for c in batch.columns}
    return {k: (v.tolist() if isinstance(v, np.ndarray) else list(v)) for k, v in batch.items()}
