"""Offline encoding of a whole collection: ``cmhash encode`` as a library call.

    summary = encode_collection("bundle/", "photos/", "out/", batch_size=64, workers=4)

Output folder::

    job.json        what is being encoded (input, modality, shard, chunking, bundle); a resume
                    must match it
    parts/          one part-NNNNNN.npz per finished chunk (codes, ids, errors), written
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
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .files import atomic_path, atomic_write
from .errors import ArgumentTypeError, CmhashError, EncodeJobError, InvalidArgumentError
from .inputs import Record, read_collection, text_input

JOB_FORMAT = "cmhash.encode"
JOB_VERSION = 1
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
    records = read_collection(source, modality)
    mine = records[shard[0] :: shard[1]]
    job = {
        "format": JOB_FORMAT,
        "version": JOB_VERSION,
        "input": str(Path(source).resolve()),
        "input_fingerprint": _fingerprint(records),
        "modality": modality,
        "shard": list(shard),
        "chunk_size": chunk_size,
        "items": len(mine),
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
    chunks = [mine[k : k + chunk_size] for k in range(0, len(mine), chunk_size)]
    total = len(mine)
    done = sum(len(chunks[k]) for k in done_parts if k < len(chunks))
    items_now = 0
    if progress is not None:
        progress(done, total, 0.0)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cmhash-decode") as pool:
        for k, chunk in enumerate(chunks):
            if k in done_parts:
                continue
            codes, ids, errors = encode_records(encoder, modality, chunk, batch_size, pool)
            _write_part(out / "parts" / f"part-{k:06d}.npz", codes, ids, errors)
            items_now += len(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total, time.perf_counter() - started)
    return _require_some_encoded(_merge(out, job, mine, len(chunks), time.perf_counter() - started, items_now))


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


def _fingerprint(records: list[Record]) -> str:
    digest = hashlib.sha256()
    for r in records:
        digest.update(f"{r.number}\t{r.name}\t{r.image}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


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


def _write_part(path: Path, codes, ids, errors) -> None:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        codes=codes,
        ids=np.asarray(ids, dtype=np.int64),
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


def _merge(out: Path, job: dict, mine: list[Record], n_chunks: int, seconds: float, items_now: int) -> dict:
    """Gather the parts into the codes and errors files (npz and JSON lines, or Parquet). Beyond the parts' codes and ids
    (a few bytes per item), nothing per item is held twice: names are looked up in ``mine``
    by position and the npz file is written straight to disk."""
    codes, ids, errors = [], [], []
    for k in range(n_chunks):
        path = out / "parts" / f"part-{k:06d}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                codes.append(z["codes"])
                ids.append(z["ids"])
                errors.extend({"id": int(i), "item": str(n), "reason": str(r)}
                              for i, n, r in zip(z["error_ids"], z["error_items"], z["error_reasons"]))
        except (OSError, ValueError, KeyError) as exc:
            raise EncodeJobError(f"{path} is missing or damaged ({exc}); delete it and resume to redo its items") from exc
    codes = np.concatenate(codes) if codes else np.zeros((0, job["bits"] // 8), np.uint8)
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    seen = np.concatenate([ids, np.asarray([e["id"] for e in errors], dtype=np.int64)])
    expected = np.fromiter((r.number for r in mine), dtype=np.int64, count=len(mine))  # ascending
    if len(seen) != len(expected) or not np.array_equal(np.sort(seen), expected):
        raise EncodeJobError(f"{out}: the parts do not cover every item exactly once; delete {out}/parts and start again")
    at = np.searchsorted(expected, ids)  # each id's record in mine
    names = np.asarray([mine[k].name for k in at], dtype=str) if len(ids) else np.zeros(0, dtype=str)
    # the codes file, the errors file and summary.json are one unit: summary.json, written last,
    # marks the job finished; until it exists the parts stay and a resume redoes this merge.
    if job.get("output_format") == "parquet":
        from . import parquet

        codes_file, errors_file = out / "codes.parquet", out / "errors.parquet"
        parquet.write_table(parquet.codes_table(ids, codes, names.tolist(), bits=job["bits"],
                                                bundle_fingerprint=job["bundle_fingerprint"]), codes_file)
        parquet.write_table(parquet.errors_table(errors), errors_file)
    else:
        codes_file, errors_file = out / "codes.npz", out / "errors.jsonl"
        with atomic_path(codes_file) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, codes=codes, ids=ids, names=names, bundle_fingerprint=np.asarray(job["bundle_fingerprint"]))
        atomic_write(errors_file, ((json.dumps(e, ensure_ascii=False) + "\n").encode() for e in errors))
    summary = {
        "input": job["input"],
        "modality": job["modality"],
        "shard": f"{job['shard'][0]}/{job['shard'][1]}",
        "items": len(mine),
        "encoded": int(len(ids)),
        "errors": len(errors),
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
