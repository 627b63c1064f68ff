"""Offline encoding of a whole collection: ``cmhash encode`` as a library call.

    summary = encode_collection("bundle/", "photos/", "out/", batch_size=64, workers=4)

Output folder::

    job.json        what is being encoded (input, modality, shard, chunking, bundle); a resume
                    must match it
    parts/          one part-NNNNNN.npz per finished chunk (codes, ids, names, errors), written
                    atomically; removed once merged
    codes.npz       codes (n, bits/8) uint8, ids (n,) int64, names (n,), bundle_fingerprint (the
                    bundle's :attr:`~cmhash.bundle.Bundle.fingerprint`): ``HashIndex.add(codes,
                    ids)`` and ``cmhash index build out/codes.npz`` take it directly
    errors.jsonl    one line per item that could not be encoded (unreadable, or a text with no
                    word in the vocabulary): id, item, reason
    summary.json    counts and timing

With ``output_format="parquet"`` (``--format parquet``) the job writes ``codes.parquet`` (id,
name, code, with the bits and the bundle fingerprint in its metadata: :mod:`cmhash.parquet`)
and ``errors.parquet`` (id, item, reason) instead of ``codes.npz`` and ``errors.jsonl``.

Ids are the items' positions in the whole input (see :mod:`cmhash.inputs`), so the shards of
``--shard i/N`` (every N-th item, from the i-th) never collide and their codes can be added
to one index. A job killed at any point resumes with ``resume=True``: finished chunks are
kept, the rest is encoded again; every item ends up exactly once in the codes or in the
errors (checked before ``codes.npz`` is written). ``summary.json`` is written last and marks
a finished job; a job killed while merging (``codes.npz`` there, ``summary.json`` not) is
merged again from its parts on resume.

Memory stays flat in the number of items: the input is streamed (:func:`~cmhash.inputs.iter_collection`)
once to count and fingerprint it, once to encode it a chunk at a time, and once more beside
the parts to check them; the output files are written a part at a time.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .files import atomic_path, atomic_write
from .errors import ArgumentTypeError, CmhashError, EncodeJobError, InvalidArgumentError
from .inputs import Record, iter_collection, text_input

JOB_FORMAT = "cmhash.encode"
JOB_VERSION = 2  # 2: parts hold the names of their codes
DEFAULT_CHUNK = 1024
OUTPUT_FORMATS = ("npz", "parquet")
NO_KNOWN_WORD = "no word of the text is in the bundle's vocabulary"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise EncodeJobError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise EncodeJobError(f"--shard {text}: need 0 <= i < N")
    return i, n


def encode_collection(
    bundle: str | os.PathLike,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    modality: str | None = None,
    batch_size: int = 32,
    workers: int = 4,
    shard: tuple[int, int] | str = (0, 1),
    resume: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    variant: str = "fp32",
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    encoder: Any = None,
    output_format: str = "npz",
) -> dict:
    """Encode every item of ``source`` into ``out_dir`` (see the module docstring).

    Args:
        bundle: the bundle to hash with (ignored when ``encoder`` is given).
        source: a folder, a file list or a manifest (:mod:`cmhash.inputs`).
        modality: ``"image"`` or ``"text"``; default: image when the bundle has it.
        batch_size: items per model call. workers: decoding threads.
        shard: ``(i, N)`` or ``"i/N"``: encode every N-th item starting at the i-th.
        resume: continue a job in ``out_dir`` (else the folder must be new or empty).
        chunk_size: items per part file (the unit of resumption); fixed for a job.
        progress: called as ``progress(done, total, seconds)`` once at the start (seconds 0,
            ``done`` the items an earlier run finished) and after each chunk.
        output_format: ``"npz"`` (codes.npz, errors.jsonl) or ``"parquet"`` (codes.parquet,
            errors.parquet; needs the parquet extra).

    Returns:
        The summary (also written to ``summary.json``).
    """
    from .encoder import Encoder

    for name, value in (("batch_size", batch_size), ("workers", workers), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ArgumentTypeError(f"{name} must be a positive int, got {value!r}")
        if value < 1:
            raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
    if output_format not in OUTPUT_FORMATS:
        raise InvalidArgumentError(f"output_format must be 'npz' or 'parquet', got {output_format!r}")
    if output_format == "parquet":
        from .parquet import _pyarrow

        _pyarrow()  # a missing extra is said now, not after the encoding
    shard = parse_shard(shard) if isinstance(shard, str) else tuple(shard)
    parse_shard(f"{shard[0]}/{shard[1]}")
    out = Path(out_dir)
    if encoder is None:
        encoder = Encoder.load(bundle, backend=backend, device=device, threads=threads, variant=variant)
    if modality is None:
        modality = "image" if "image" in encoder.modalities else "text"
    encoder._require(modality)
    fingerprint, n_records = input_fingerprint(iter_collection(source, modality, read_texts=False))
    job = {
        "format": JOB_FORMAT,
        "version": JOB_VERSION,
        "input": str(Path(source).resolve()),
        "input_fingerprint": fingerprint,
        "modality": modality,
        "shard": list(shard),
        "chunk_size": chunk_size,
        "items": len(range(shard[0], n_records, shard[1])),
        "bits": encoder.bits,
        "variant": encoder.variant,
        "bundle": hashlib.sha256(json.dumps(encoder.bundle.manifest, sort_keys=True).encode()).hexdigest(),
        "bundle_fingerprint": encoder.fingerprint,
        "output_format": output_format,
    }
    done_parts = _prepare(out, job, resume)
    if (out / "summary.json").exists():  # a finished job, resumed: nothing to do
        shutil.rmtree(out / "parts", ignore_errors=True)  # in case a kill came just before it went
        return _require_some_encoded(json.loads((out / "summary.json").read_text()))

    started = time.perf_counter()
    total = job["items"]
    n_chunks = -(-total // chunk_size)
    done = sum(min(chunk_size, total - k * chunk_size) for k in done_parts if k < n_chunks)
    items_now = 0
    if progress is not None:
        progress(done, total, 0.0)
    if done < total:  # else (a kill in the merge) the input need not be read again
        for items in _encode_chunks(encoder, source, out, job, done_parts, batch_size, workers):
            items_now += items
            if progress is not None:
                progress(done + items_now, total, time.perf_counter() - started)
    chunks = _chunks(source, job, read_texts=False)
    return _require_some_encoded(_merge(out, job, chunks, time.perf_counter() - started, items_now))


def _encode_chunks(encoder, source, out: Path, job: dict, done_parts: set[int], batch_size: int,
                   workers: int) -> Iterator[int]:
    """Encode each chunk not done into its part file, yielding its number of items. One
    chunk of records and its codes are held at a time."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cmhash-decode") as pool:
        for k, chunk in enumerate(_chunks(source, job)):
            if k in done_parts:
                continue
            codes, ids, errors = encode_records(encoder, job["modality"], chunk, batch_size, pool)
            name_of = {r.number: r.name for r in chunk}
            _write_part(_part_path(out, k), codes, ids, [name_of[i] for i in ids], errors)
            yield len(chunk)


def _chunks(source, job: dict, read_texts: bool = True) -> Iterator[list[Record]]:
    """The job's shard of ``source``, streamed in lists of ``chunk_size`` records (chunk k
    is part k)."""
    i, n = job["shard"]
    mine = itertools.islice(iter_collection(source, job["modality"], read_texts=read_texts), i, None, n)
    while chunk := list(itertools.islice(mine, job["chunk_size"])):
        yield chunk


# what a record lacks when it was meant for the other modality -> the option that was meant
_OTHER_MODALITY = {"the record has no 'image'": "text", "the record has no 'text' or 'tags'": "image"}


def _require_some_encoded(summary: dict) -> dict:
    """The summary, or an :class:`EncodeJobError` when items were given and none encoded
    (the files stay written: errors.jsonl lists every reason)."""
    if summary["encoded"] or not summary["items"]:
        return summary
    if summary["errors_file"].endswith(".parquet"):
        from .parquet import read_errors

        first = read_errors(summary["errors_file"])[0]
    else:
        with open(summary["errors_file"], encoding="utf-8") as f:
            first = json.loads(f.readline())
    other = _OTHER_MODALITY.get(first["reason"])
    hint = f"; encode it with --modality {other} (modality='{other}')" if other else ""
    raise EncodeJobError(f"none of the {summary['items']} items could be encoded ({first['item']}: {first['reason']}; "
                         f"all reasons in {summary['errors_file']}){hint}")


# --- job folder ------------------------------------------------------------------------------------


def input_fingerprint(records: Iterable[Record]) -> tuple[str, int]:
    """The sha256 of the records' numbers, names and image paths (what ids and names come
    from; a resume must see the same), and how many records there are. Every engine's jobs
    record it."""
    digest = hashlib.sha256()
    count = 0
    for r in records:
        digest.update(f"{r.number}\t{r.name}\t{r.image}\n".encode("utf-8", "surrogatepass"))
        count += 1
    return digest.hexdigest(), count


def _prepare(out: Path, job: dict, resume: bool) -> set[int]:
    """Check or create the job folder; the chunk numbers already done."""
    job_file = out / "job.json"
    if job_file.exists():
        if not resume:
            raise EncodeJobError(f"{out} already holds an encoding job; pass --resume to continue it, or use a new folder")
        try:
            old = json.loads(job_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EncodeJobError(f"{job_file} is unreadable ({exc}); remove the folder and start again") from exc
        if old.get("version") != job["version"]:
            raise EncodeJobError(f"{out} holds a job of another cmhash version (job format {old.get('version')!r}, "
                                 f"this one writes {job['version']}); finish it with that version, or start "
                                 "again in a new folder")
        changed = sorted(k for k in job if old.get(k) != job[k])
        if changed:
            raise EncodeJobError(
                f"cannot resume {out}: the job differs in " + ", ".join(f"{k} ({old.get(k)!r} -> {job[k]!r})" for k in changed)
            )
    else:
        if out.exists() and any(out.iterdir()):
            raise EncodeJobError(f"{out} is not empty and holds no encoding job; choose a new or empty folder")
        (out / "parts").mkdir(parents=True, exist_ok=True)
        atomic_write(job_file, (json.dumps(job, indent=2) + "\n").encode())
    done = set()
    for part in (out / "parts").glob("part-*.npz") if (out / "parts").exists() else []:
        done.add(int(part.stem.split("-")[1]))
    return done


def _part_path(out: Path, k: int) -> Path:
    return out / "parts" / f"part-{k:06d}.npz"


def _write_part(path: Path, codes, ids, names, errors) -> None:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        codes=codes,
        ids=np.asarray(ids, dtype=np.int64),
        names=np.asarray(names, dtype=str),
        error_ids=np.asarray([e["id"] for e in errors], dtype=np.int64),
        error_items=np.asarray([e["item"] for e in errors], dtype=str),
        error_reasons=np.asarray([e["reason"] for e in errors], dtype=str),
    )
    atomic_write(path, buffer.getvalue())


# --- encoding ----------------------------------------------------------------------------------------


def encode_records(encoder, modality: str, records: list[Record], batch_size: int, pool: ThreadPoolExecutor | None = None):
    """Records -> (codes (n, bits/8) uint8, their ids, error rows ``{"id", "item", "reason"}``).

    The one way every engine turns items into codes (this module, Ray's and Spark's batch
    functions): an item that cannot be prepared becomes an error row, never an exception.
    A batch at a time: with a ``pool``, the decoding threads prepare the next batch while the
    model runs on this one, and at most two batches of model input are held (a chunk of
    224-pixel images would be over half a GiB); without one, items are prepared in this thread."""
    batches = [records[start : start + batch_size] for start in range(0, len(records), batch_size)]

    def submit(batch):
        if pool is None:
            return [_Done(prepare_input(encoder, modality, r)) for r in batch]
        return [pool.submit(prepare_input, encoder, modality, r) for r in batch]

    pending = submit(batches[0]) if batches else []
    codes, ids, errors = [], [], []
    for b, batch in enumerate(batches):
        prepared = [future.result() for future in pending]
        pending = submit(batches[b + 1]) if b + 1 < len(batches) else []
        errors.extend({"id": r.number, "item": r.name, "reason": reason}
                      for r, (_, reason) in zip(batch, prepared) if reason)
        good = [(r, x) for r, (x, reason) in zip(batch, prepared) if not reason]
        if good:
            codes.append(encoder.hash_preprocessed(modality, np.stack([x for _, x in good])))
            ids.extend(r.number for r, _ in good)
    codes = np.concatenate(codes) if codes else np.zeros((0, encoder.bits // 8), dtype=np.uint8)
    return codes, ids, errors


class _Done:
    """An already computed result, shaped like a finished future."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def prepare_input(encoder, modality: str, record: Record):
    """One record -> (model input, None), or (None, the reason it cannot be encoded)."""
    return (_image_input if modality == "image" else _text_input)(encoder, record)


def _image_input(encoder, record: Record):
    try:
        if record.problem:
            return None, record.problem
        if record.image is None:
            return None, "the record has no 'image'"
        return encoder.preprocessor.pixels(record.image), None
    except CmhashError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    except OSError as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _text_input(encoder, record: Record):
    try:
        if record.problem:
            return None, record.problem
        item = text_input(record, encoder.vocabulary, encoder.text_dim)
        if isinstance(item, np.ndarray):
            return item, None
        row = encoder.encode_text_input(item)
        if not row.any():  # every such item would get one code, the empty text's: listed, not indexed
            return None, NO_KNOWN_WORD
        return row, None
    except CmhashError as exc:
        return None, f"{type(exc).__name__}: {exc}"


# --- merging ------------------------------------------------------------------------------------------


def _read_part(out: Path, k: int, *keys: str) -> list[np.ndarray]:
    path = _part_path(out, k)
    try:
        with np.load(path, allow_pickle=False) as z:
            return [z[key] for key in keys]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise EncodeJobError(f"{path} is missing or damaged ({exc}); delete it and resume to redo its items") from exc


def _part_errors(out: Path, k: int) -> list[dict]:
    ids, items, reasons = _read_part(out, k, "error_ids", "error_items", "error_reasons")
    return [{"id": int(i), "item": str(n), "reason": str(r)} for i, n, r in zip(ids, items, reasons)]


def _merge(out: Path, job: dict, chunks: Iterable[list[Record]], seconds: float, items_now: int) -> dict:
    """Gather the parts into the codes and errors files (npz and JSON lines, or Parquet), a
    part at a time: a first pass checks each part against its chunk of the input (``chunks``,
    streamed beside them) and sizes the output, a pass per output column writes it."""
    width = job["bits"] // 8
    parts = range(-(-job["items"] // job["chunk_size"]))
    encoded = errors = 0
    name_length = 1  # numpy's str arrays are at least <U1
    for k, chunk in itertools.zip_longest(parts, chunks):
        covered = k is not None and chunk is not None  # else the input's length changed
        if covered:
            codes, ids, names, error_ids = _read_part(out, k, "codes", "ids", "names", "error_ids")
            expected = np.fromiter((r.number for r in chunk), dtype=np.int64, count=len(chunk))  # ascending
            covered = np.array_equal(np.sort(np.concatenate([ids, error_ids])), expected)
        if not covered:
            raise EncodeJobError(f"{out}: the parts do not cover every item exactly once; "
                                 f"delete {out}/parts and start again")
        if codes.shape != (len(ids), width) or names.shape != ids.shape:
            raise EncodeJobError(f"{_part_path(out, k)} is damaged (its codes, ids and names disagree); "
                                 "delete it and resume to redo its items")
        encoded += len(ids)
        errors += len(error_ids)
        name_length = max(name_length, names.dtype.itemsize // np.dtype("U1").itemsize)
    # the codes file, the errors file and summary.json are one unit: summary.json, written last,
    # marks the job finished; until it exists the parts stay and a resume redoes this merge.
    if job.get("output_format") == "parquet":
        from . import parquet

        codes_file, errors_file = out / "codes.parquet", out / "errors.parquet"
        schema = parquet.codes_schema(job["bits"], bundle_fingerprint=job["bundle_fingerprint"])
        parquet.write_tables((parquet.codes_table(ids, codes, names.tolist(), bits=job["bits"],
                                                  bundle_fingerprint=job["bundle_fingerprint"])
                              for codes, ids, names in (_read_part(out, k, "codes", "ids", "names") for k in parts)),
                             codes_file, schema=schema)
        parquet.write_tables((parquet.errors_table(_part_errors(out, k)) for k in parts), errors_file,
                             schema=parquet.ERRORS_SCHEMA)
    else:
        codes_file, errors_file = out / "codes.npz", out / "errors.jsonl"
        fingerprint = np.asarray(job["bundle_fingerprint"])
        _write_npz(codes_file, [
            ("codes", np.dtype(np.uint8), (encoded, width), (_read_part(out, k, "codes")[0] for k in parts)),
            ("ids", np.dtype(np.int64), (encoded,), (_read_part(out, k, "ids")[0] for k in parts)),
            ("names", np.dtype(f"U{name_length}"), (encoded,), (_read_part(out, k, "names")[0] for k in parts)),
            ("bundle_fingerprint", fingerprint.dtype, (), [fingerprint]),
        ])
        atomic_write(errors_file, ((json.dumps(e, ensure_ascii=False) + "\n").encode()
                                   for k in parts for e in _part_errors(out, k)))
    summary = {
        "input": job["input"],
        "modality": job["modality"],
        "shard": f"{job['shard'][0]}/{job['shard'][1]}",
        "items": job["items"],
        "encoded": encoded,
        "errors": errors,
        "bits": job["bits"],
        "variant": job["variant"],
        "bundle_fingerprint": job["bundle_fingerprint"],
        "items_this_run": items_now,  # less than items after a resume
        "seconds": round(seconds, 3),
        "items_per_second": round(items_now / seconds, 1) if seconds > 0 else 0.0,
        "codes": str(codes_file),
        "errors_file": str(errors_file),
    }
    atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    shutil.rmtree(out / "parts", ignore_errors=True)
    return summary


def _write_npz(path: Path, members: list[tuple[str, np.dtype, tuple, Iterable[np.ndarray]]]) -> None:
    """The file ``np.savez(path, name=array, ...)`` writes, written atomically a block at a
    time: each member is (name, dtype, shape, blocks), the blocks being the array's rows in
    order (C order), so no whole array is ever held."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, dtype, shape, blocks in members:
            with archive.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
                size = 0
                for block in blocks:
                    data = np.ascontiguousarray(block, dtype=dtype)
                    f.write(data.tobytes())
                    size += data.size
                if size != int(np.prod(shape)):  # the parts changed since they were checked
                    raise EncodeJobError(f"{path}: the parts changed while they were merged; resume to merge again")


class Progress:
    """A progress display on stderr: items, items/s and ETA; one line kept up to date on a
    terminal, a plain line per chunk otherwise (a log, ``nohup``). The rate counts only the
    items of this run: the first call (at 0 seconds) says how many an earlier run finished."""

    def __init__(self, stream=None, every: float = 0.5):
        self.stream = stream or sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every
        self._last = -1.0
        self._before: int | None = None

    def __call__(self, done: int, total: int, seconds: float) -> None:
        if self._before is None:
            self._before = done
        if seconds > 0 and self.live and seconds - self._last < self.every and done < total:
            return
        self._last = seconds
        rate = (done - self._before) / seconds if seconds > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        line = f"{done}/{total} items  {rate:,.1f} items/s  ETA {_clock(eta)}"
        if self.live:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
