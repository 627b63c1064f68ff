"""Encoding on Ray Data: :class:`HashBatches` for any ``map_batches`` pipeline, and
:func:`encode_with_ray`, the resumable ``cmhash encode --engine ray``.

Output folder (a local path or an fsspec URL)::

    job.json                      what is being encoded; a resume must match it
    codes/part-NNNNNN.parquet     id, name, code (fixed-size binary) with the bundle's bits and
                                  fingerprint in the schema metadata (:mod:`cmhash.parquet`)
    errors/part-NNNNNN.parquet    id, item, reason of the items that could not be encoded
    summary.json                  counts and timing; written last, marks a finished job

Part ``k`` holds the items of chunk ``k`` (``chunk_size`` items of a folder, file list or
manifest; one row group of a Parquet input). Its errors part is written before its codes
part, each atomically, so a codes part marks a finished chunk: a rerun after a kill encodes
only the chunks without one, and before ``summary.json`` is written every item's id is
checked to be in the codes or the errors exactly once. Ids are positions in the whole input,
as ``cmhash encode`` gives them, so the codes of both are the same rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..cpus import available_cpus
from ..errors import EncodeJobError, InvalidArgumentError
from ..inputs import IMAGE_SUFFIXES, Record, read_collection
from ..offline import input_fingerprint
from .batches import as_columns, encode_prepared, hash_items, is_url, process_encoder

JOB_FORMAT = "cmhash.encode-ray"
JOB_VERSION = 1
PARQUET_SUFFIX = ".parquet"
IMAGE_COLUMNS = ("image", "content", "bytes", "path")  # what an image column is called, by preference
TEXT_COLUMNS = ("text", "caption")


class HashBatches:
    """A callable class for ``ray.data.Dataset.map_batches``: hashes a batch of items with
    one :class:`~cmhash.encoder.Encoder` per actor.

        ds.map_batches(HashBatches, fn_constructor_args=(bundle,),
                       fn_constructor_kwargs={"modality": "image", "column": "image"},
                       concurrency=4, num_cpus=2, batch_size=64)

    The input batch has the items in ``column`` (image bytes, local paths or fsspec URLs;
    or texts) and optionally ``id`` (default: the row's position in the batch) and ``name``.
    The output has one row per input row: ``id``, ``name``, ``code`` (fixed-size binary of
    bits/8 bytes, null for an item that could not be encoded) and ``reason`` (null, or why
    not). A bad item is an error row, never a failed task.

    onnxruntime gets as many intra-op threads as the actor has CPUs (``num_cpus``), unless
    ``threads`` says otherwise; an actor given a GPU (``num_gpus``) runs on CUDA, with the
    TensorRT backend where it is installed (``backend="auto"``).
    """

    def __init__(self, bundle, *, modality: str | None = None, column: str = "item", variant: str = "fp32",
                 backend: str = "auto", threads: int | None = None, batch_size: int = 32):
        import ray

        if isinstance(bundle, ray.ObjectRef):
            bundle = ray.get(bundle)
        try:  # in an actor: the resources it was given
            resources = ray.get_runtime_context().get_assigned_resources()
            cpus = max(1, int(resources.get("CPU", 1)))
        except AssertionError:  # called in the driver (or without Ray): this process's CPUs
            resources, cpus = {}, available_cpus()
        device = "cuda" if resources.get("GPU", 0) else "cpu"
        self.threads = threads or cpus
        self.encoder = process_encoder(bundle, variant=variant, backend=backend, device=device, threads=self.threads)
        self.modality = modality or ("image" if "image" in self.encoder.modalities else "text")
        self.encoder._require(self.modality)
        self.column = column
        self.batch_size = batch_size

    def __call__(self, batch: Any):
        columns = as_columns(batch)
        if self.column not in columns:
            raise InvalidArgumentError(f"the batch has no column {self.column!r} (it has: {', '.join(columns)}); "
                                       "pass column= the one holding the items")
        items = columns[self.column]
        ids = columns.get("id") or list(range(len(items)))
        codes, hashed, errors = hash_items(self.encoder, self.modality, ids, items, columns.get("name"),
                                           batch_size=self.batch_size, workers=self.threads)
        return _rows(self.encoder.bits, ids, columns.get("name"), items, self.modality, codes, hashed, errors)


def _rows(bits: int, ids, names, items, modality, codes, hashed, errors):
    """One output row per input row, in input order."""
    import pyarrow as pa

    code_of = dict(zip(hashed, codes))
    reason_of = {e["id"]: e["reason"] for e in errors}
    name_of = {e["id"]: e["item"] for e in errors}
    out_names = [str(n) if n is not None else None for n in names] if names is not None else [
        name_of.get(int(i), items[k] if modality == "image" and isinstance(items[k], str) else None)
        for k, i in enumerate(ids)]
    return pa.table({
        "id": pa.array([int(i) for i in ids], pa.int64()),
        "name": pa.array(out_names, pa.string()),
        "code": pa.array([code_of[int(i)].tobytes() if int(i) in code_of else None for i in ids], pa.binary(bits // 8)),
        "reason": pa.array([reason_of.get(int(i)) for i in ids], pa.string()),
    })


class EncodeParts(HashBatches):
    """``map_batches`` callable of :func:`encode_with_ray`: each input row describes one
    chunk; the actor reads its items, hashes them and writes the chunk's errors part, then
    its codes part."""

    def __init__(self, bundle, *, out: str, fingerprint: str, **kwargs):
        super().__init__(bundle, **kwargs)
        self.out = out
        self.fingerprint = fingerprint

    def __call__(self, batch: Any):
        from ..parquet import codes_table, errors_table, write_table

        done = {"part": [], "encoded": [], "errors": []}
        for part in as_columns(batch)["part"]:
            part = json.loads(part)
            records = _part_records(part, self.modality)
            codes, ids, errors = encode_prepared(self.encoder, self.modality, records, batch_size=self.batch_size,
                                                 workers=self.threads)
            name_of = {r.number: r.name for r in records}
            write_table(errors_table(errors), _part_url(self.out, "errors", part["part"]))
            write_table(codes_table(ids, codes, [name_of[i] for i in ids], bits=self.encoder.bits,
                                    bundle_fingerprint=self.fingerprint), _part_url(self.out, "codes", part["part"]))
            done["part"].append(part["part"])
            done["encoded"].append(len(ids))
            done["errors"].append(len(errors))
        return done


def encode_with_ray(
    bundle: str | os.PathLike,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    modality: str | None = None,
    column: str | None = None,
    address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: int = 1,
    gpus_per_actor: float = 0,
    chunk_size: int = 1024,
    batch_size: int = 32,
    variant: str = "fp32",
    backend: str = "auto",
    resume: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Encode every item of ``source`` on a Ray cluster into Parquet parts in ``out`` (see
    the module docstring).

    Args:
        bundle: the bundle, read here and shipped to the actors (the cluster need not see its path).
        source: a folder, file list or manifest (as ``cmhash encode`` reads them), a folder
            URL of images (``s3://bucket/photos/``), or Parquet (a ``.parquet`` file or a
            folder or URL of them) with the items in ``column``: image bytes, paths or URLs, or texts.
        column: the Parquet column of the items; default the first of image, content,
            bytes, path (images) or text, caption (texts).
        address: the Ray cluster (``ray://host:10001``, ``auto``); default: the one this
            process is connected to, else a new local one for this call.
        actors: concurrent encoder actors; default as many as the cluster's CPUs allow.
        cpus_per_actor, gpus_per_actor: each actor's resources; its onnxruntime threads
            are its CPUs, and an actor with a GPU runs on CUDA (TensorRT where installed).
        chunk_size: items per part (the unit of resumption) for a folder, list or manifest.
        resume: continue a job in ``out`` (else the folder must be new or empty).
        progress: ``progress(done, total, seconds)``, at the start and after each part.

    Returns:
        The summary (also written to ``summary.json``).
    """
    import ray

    from ..bundle import Bundle, load_bundle

    for name, value in (("chunk_size", chunk_size), ("batch_size", batch_size), ("cpus_per_actor", cpus_per_actor)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if modality is None:
        modality = "image" if "image" in loaded.modalities else "text"
    if modality not in loaded.modalities:
        raise EncodeJobError(f"this bundle has no {modality} model (it has: {', '.join(loaded.modalities)})")
    out = _url(out)
    parts, expected, input_fingerprint, column = _plan(source, modality, chunk_size, column)
    job = {
        "format": JOB_FORMAT,
        "version": JOB_VERSION,
        "input": _url(source),
        "input_fingerprint": input_fingerprint,
        "modality": modality,
        "column": column,
        "chunk_size": chunk_size,
        "items": len(expected),
        "parts": len(parts),
        "bits": loaded.bits,
        "variant": variant,
        "bundle_fingerprint": loaded.fingerprint,
    }
    done = _prepare(out, job, resume)
    if _exists(f"{out}/summary.json"):
        return json.loads(_read(f"{out}/summary.json"))

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    elif address is not None:
        raise EncodeJobError(f"this process is already connected to a Ray cluster; cannot connect to {address} too "
                             "(leave address out, or call ray.shutdown() first)")
    try:
        started = time.perf_counter()
        pending = [p for p in parts if p["part"] not in done]
        total = len(expected)
        count = total - sum(p["items"] for p in pending)
        items_now = 0
        if progress is not None:
            progress(count, total, 0.0)
        if pending:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
            cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
            actors = actors or max(1, min(len(pending), cluster_cpus // cpus_per_actor))
            dataset = ray.data.from_items([{"part": json.dumps(p)} for p in pending], override_num_blocks=len(pending))
            results = dataset.map_batches(
                EncodeParts,
                fn_constructor_args=(ray.put(loaded),),
                fn_constructor_kwargs={"out": out, "fingerprint": loaded.fingerprint, "modality": modality,
                                       "variant": variant, "backend": backend, "batch_size": batch_size},
                batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                num_gpus=gpus_per_actor or None,
            )
            sizes = {p["part"]: p["items"] for p in pending}
            for row in results.iter_rows():
                items_now += sizes[row["part"]]
                count += sizes[row["part"]]
                if progress is not None:
                    progress(count, total, time.perf_counter() - started)
        return _finish(out, job, expected, time.perf_counter() - started, items_now)
    finally:
        if started_here:
            ray.shutdown()


# --- input ---------------------------------------------------------------------------------------------


def _url(path: str | os.PathLike) -> str:
    """A local path made absolute, or a URL as given (without a trailing slash)."""
    text = os.fspath(path)
    return text.rstrip("/") if is_url(text) else str(Path(text).resolve())


def _fs(url: str):
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def _plan(source, modality: str, chunk_size: int, column: str | None):
    """The parts of the input, the ids it holds, its fingerprint and the Parquet column used."""
    url = _url(source)
    fs, path = _fs(url)
    if not fs.exists(path):
        raise EncodeJobError(f"input not found: {url}")
    parquet = [path] if path.endswith(PARQUET_SUFFIX) else (
        sorted(p for p in fs.find(path) if p.endswith(PARQUET_SUFFIX)) if fs.isdir(path) else [])
    if parquet:
        return _plan_parquet(fs, parquet, modality, column)
    if column is not None:
        raise EncodeJobError(f"column={column!r} is for Parquet input, and {url} holds no .parquet files")
    if is_url(url):
        if modality != "image" or not fs.isdir(path):
            raise EncodeJobError(f"{url}: a URL input must be Parquet or a folder of images; copy file lists, "
                                 "manifests and texts to a local path")
        found = sorted((p for p in fs.find(path) if Path(p).suffix.lower() in IMAGE_SUFFIXES),
                       key=lambda p: p[len(path):])
        protocol = url.split("://", 1)[0]
        records = [Record(n, p[len(path):].lstrip("/"), image=f"{protocol}://{p}") for n, p in enumerate(found)]
        if not records:
            raise EncodeJobError(f"{url} holds no images to encode")
    else:
        records = read_collection(url, modality)
    parts = []
    for k, start in enumerate(range(0, len(records), chunk_size)):
        chunk = records[start : start + chunk_size]
        parts.append({"part": k, "items": len(chunk), "records": [_record_json(r) for r in chunk]})
    return parts, [r.number for r in records], input_fingerprint(records)[0], None


def _record_json(r: Record) -> dict:
    return {"id": r.number, "name": r.name, "image": None if r.image is None else str(r.image), "text": r.text,
            "tags": list(r.tags), "problem": r.problem}


def _plan_parquet(fs, files: list[str], modality: str, column: str | None):
    import pyarrow.parquet as pq

    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    parts, first, digest = [], 0, hashlib.sha256()
    for file in files:
        meta = pq.ParquetFile(file, filesystem=fs).metadata
        names = meta.schema.names
        if column is None:
            column = next((c for c in (IMAGE_COLUMNS if modality == "image" else TEXT_COLUMNS) if c in names), None)
            if column is None:
                raise EncodeJobError(f"{file} has no column named {' or '.join(IMAGE_COLUMNS if modality == 'image' else TEXT_COLUMNS)}; "
                                     f"name the column of the items with --column (column=) (it has: {', '.join(names)})")
        if column not in names:
            raise EncodeJobError(f"{file} has no column {column!r} (it has: {', '.join(names)})")
        url = file if protocol in ("file", "local") else f"{protocol}://{file}"
        digest.update(f"{url}\t{meta.num_rows}\t{meta.num_row_groups}\n".encode())
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            parts.append({"part": len(parts), "items": rows, "file": url, "row_group": group, "first_id": first,
                          "column": column})
            first += rows
    return parts, list(range(first)), digest.hexdigest(), column


def _part_records(part: dict, modality: str) -> list[Record]:
    """The records of one part, read where the part is encoded."""
    if "records" in part:
        return [Record(r["id"], r["name"], image=_local_or_url(r["image"]), text=r["text"], tags=tuple(r["tags"]),
                       problem=r["problem"]) for r in part["records"]]
    import pyarrow.parquet as pq

    fs, path = _fs(part["file"])
    column = part["column"]
    schema = pq.ParquetFile(path, filesystem=fs).schema_arrow
    wanted = [column] + [c for c in ("name",) if c in schema.names and c != column]
    table = pq.ParquetFile(path, filesystem=fs).read_row_group(part["row_group"], columns=wanted)
    items = table.column(column).to_pylist()
    names = table.column("name").to_pylist() if "name" in wanted else [None] * len(items)
    base = part["file"].rsplit("/", 1)[-1]
    records = []
    for k, (item, name) in enumerate(zip(items, names)):
        number = part["first_id"] + k
        label = str(name) if name is not None else (item if isinstance(item, str) and modality == "image"
                                                    else f"{base}:{part['row_group']}:{k}")
        if item is None:
            records.append(Record(number, label, problem=f"no {modality} (the {column!r} value is missing)"))
        elif modality == "image":
            records.append(Record(number, label, image=_local_or_url(item) if isinstance(item, str) else item))
        else:
            records.append(Record(number, label, text=item if isinstance(item, str) else bytes(item).decode("utf-8", "replace")))
    return records


def _local_or_url(item: str | None):
    return None if item is None else (item if is_url(item) else Path(item))


# --- job folder ------------------------------------------------------------------------------------


def _part_url(out: str, kind: str, k: int) -> str:
    return f"{out}/{kind}/part-{k:06d}{PARQUET_SUFFIX}"


def _exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


def _read(url: str) -> str:
    fs, path = _fs(url)
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8")


def _write_json(url: str, obj: dict) -> None:
    """Atomic where the filesystem renames atomically (local disks, HDFS); object stores
    write a whole object at once anyway."""
    fs, path = _fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = path.rsplit("/", 1)[0] + f"/.{path.rsplit('/', 1)[1]}.{os.getpid()}.tmp"
    with fs.open(tmp, "wb") as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())
    fs.mv(tmp, path)


def _prepare(out: str, job: dict, resume: bool) -> set[int]:
    """Check or create the job folder; the part numbers already finished."""
    fs, path = _fs(out)
    if fs.exists(f"{path}/job.json"):
        if not resume:
            raise EncodeJobError(f"{out} already holds an encoding job; pass --resume to continue it, or use a new folder")
        try:
            old = json.loads(_read(f"{out}/job.json"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EncodeJobError(f"{out}/job.json is unreadable ({exc}); remove the folder and start again") from exc
        changed = sorted(k for k in job if old.get(k) != job[k])
        if changed:
            raise EncodeJobError(
                f"cannot resume {out}: the job differs in " + ", ".join(f"{k} ({old.get(k)!r} -> {job[k]!r})" for k in changed))
    else:
        if fs.exists(path) and fs.ls(path):
            raise EncodeJobError(f"{out} is not empty and holds no encoding job; choose a new or empty folder")
        _write_json(f"{out}/job.json", job)
    for kind in ("codes", "errors"):
        fs.makedirs(f"{path}/{kind}", exist_ok=True)
    codes = f"{path}/codes"
    finished = fs.ls(codes, detail=False) if fs.exists(codes) else []
    return {int(Path(p).name[5:11]) for p in finished
            if Path(p).name.startswith("part-") and Path(p).name.endswith(PARQUET_SUFFIX)}


def _finish(out: str, job: dict, expected: list[int], seconds: float, items_now: int) -> dict:
    """Check that the parts cover every item exactly once, then write ``summary.json``."""
    import pyarrow.parquet as pq

    fs, path = _fs(out)
    counts, ids = {}, {}
    for kind in ("codes", "errors"):
        tables = [pq.read_table(_part_url(path, kind, k), columns=["id"], filesystem=fs) for k in range(job["parts"])]
        ids[kind] = np.concatenate([t.column("id").to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
        counts[kind] = len(ids[kind])
    seen = np.sort(np.concatenate([ids["codes"], ids["errors"]]))
    if not np.array_equal(seen, np.sort(np.asarray(expected, dtype=np.int64))):
        raise EncodeJobError(f"{out}: the parts do not cover every item exactly once; delete {out}/codes and "
                             f"{out}/errors and resume")
    summary = {
        "engine": "ray",
        "input": job["input"],
        "modality": job["modality"],
        "items": job["items"],
        "encoded": counts["codes"],
        "errors": counts["errors"],
        "parts": job["parts"],
        "bits": job["bits"],
        "variant": job["variant"],
        "bundle_fingerprint": job["bundle_fingerprint"],
        "items_this_run": items_now,
        "seconds": round(seconds, 3),
        "items_per_second": round(items_now / seconds, 1) if seconds > 0 else 0.0,
        "codes": f"{out}/codes",
        "errors_dir": f"{out}/errors",
    }
    _write_json(f"{out}/summary.json", summary)
    return summary
