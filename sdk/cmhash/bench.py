"""What to ship: ``cmhash bench`` as a library call.

One row per (variant, model format, provider) of a bundle: file size, cold start, peak
resident memory, latency at batch 1 (p50, p99), items per second at batch 32, the share of
bits that agree with fp32 (the same provider, ONNX format) and, when the data has labels,
the mAP of the variant's codes.

Each row runs in fresh processes, so rows do not share caches, memory or loaded libraries:

- cold start: ``cold_runs`` new processes each import cmhash, ``Encoder.load`` the variant
  and hash one item; the time from starting the process to that first code, median;
- everything else in one more process: the latency of the measured tower (``modality``:
  image when the bundle has one) at batch 1 (``repeats`` calls after ``warmup``) and batch
  32, then the codes of every tower on the evaluation data; peak memory is that process's
  high-water mark of resident memory (``VmHWM`` on Linux).

Evaluation data: the bundle's reference inputs (bit agreement only: they carry no labels;
random inputs of the models' shapes for a bundle without them), or ``data``: a manifest (``.jsonl``/``.csv`` with ``image``, ``text``/``tags`` and ``labels``,
see :mod:`cmhash.inputs`) whose labels give the mAP (first fifth of the items as queries,
the rest as the database, both directions).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .cpus import cpu_name

THROUGHPUT_BATCH = 32
DEFAULT_BATCH_SIZES = (1, THROUGHPUT_BATCH)  # what a PyTorch baseline (--checkpoint) is timed at


def time_calls(call: Callable[[], object], *, warmup: int, repeats: int) -> np.ndarray:
    """Seconds per call, ``repeats`` of them after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        call()
        times[i] = time.perf_counter() - start
    return times


def summarize(times: np.ndarray, batch: int) -> dict:
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return {"p50_ms": round(p50 * 1e3, 4), "p90_ms": round(p90 * 1e3, 4), "p99_ms": round(p99 * 1e3, 4),
            "items_per_s": round(batch / p50, 1), "runs": int(len(times))}


def example_inputs(shape: tuple, batch: int, modality: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if modality == "text":
        return (rng.random((batch, *shape)) < 0.05).astype(np.float32)
    return rng.standard_normal((batch, *shape)).astype(np.float32)


# --- rows ------------------------------------------------------------------------------------------


def plan_rows(bundle, providers: list[str] | None = None, variants: list[str] | None = None) -> list[dict]:
    """The (variant, format, provider) of each row: every variant all modalities have, in
    ONNX and, where the bundle has it, ORT format; on each provider (default: the CPU)."""
    from .backends.onnxruntime_backend import CPU, provider_name

    providers = [provider_name(p) for p in (providers or [CPU])]
    common = [v for v in bundle.variants(bundle.modalities[0]) if all(v in bundle.variants(m) for m in bundle.modalities)]
    rows = []
    for variant in variants or common:
        if variant not in common:
            continue
        formats = ["onnx"] + (["ort"] if all(variant in bundle.ort_variants(m) for m in bundle.modalities) else [])
        for model_format in formats:
            for provider in providers:
                rows.append({"variant": variant, "format": model_format, "provider": provider})
    return rows


def evaluation_data(bundle, data: str | os.PathLike | None) -> tuple[dict, str]:
    """{modality: float32 model inputs} (same items across modalities when paired), plus
    ``labels`` (n, C) when the data gives them; from ``data``, else the reference sets,
    else random inputs of the models' shapes. And what they are, in words."""
    from .errors import BundleError, CmhashError
    from .inputs import read_collection, text_input
    from .reference import read_reference

    if data is None:
        if "reference" not in bundle.manifest:
            shapes = {m: tuple(bundle.modality(m)["input"]["shape"][1:]) for m in bundle.modalities}
            return ({m: example_inputs(shape, 16, m) for m, shape in shapes.items()},
                    "random inputs (the bundle carries no reference inputs; no labels: no mAP)")
        return ({m: read_reference(bundle, m)[0] for m in bundle.modalities},
                "the bundle's reference inputs (no labels: no mAP)")
    records = read_collection(data, "image" if "image" in bundle.modalities else "text")
    position = {name: j for j, name in enumerate(bundle.label_names)}
    pre = bundle.image_preprocessor() if "image" in bundle.modalities else None
    encoder_text = None
    out: dict[str, list] = {m: [] for m in bundle.modalities}
    labels = []
    for record in records:
        try:
            item = {}
            if "image" in bundle.modalities:
                item["image"] = pre.pixels(record.image)
            if "text" in bundle.modalities:
                dim = bundle.modality("text")["input"]["shape"][1]
                text = text_input(record, None, dim) if record.tags else None
                if text is None or not isinstance(text, np.ndarray):
                    if encoder_text is None:
                        encoder_text = bundle.vocabulary()
                    if encoder_text is None:
                        raise CmhashError("the bundle has no vocabulary; give tag column indices")
                    text = encoder_text.encode(text_input(record, encoder_text, dim))
                item["text"] = text
            row = None
            if record.labels is not None and bundle.label_names:
                row = np.zeros(len(bundle.label_names), np.float32)
                row[[position[x] for x in record.labels if x in position]] = 1
        except (CmhashError, OSError, TypeError):
            continue  # an unreadable item: left out, as cmhash encode does
        for m, value in item.items():
            out[m].append(value)
        labels.append(row)
    if not labels:
        raise BundleError(f"{data}: none of its items could be read for {'+'.join(bundle.modalities)}")
    result = {m: np.stack(v).astype(np.float32) for m, v in out.items()}
    if all(r is not None for r in labels):
        result["labels"] = np.stack(labels)
    return result, str(data) + ("" if "labels" in result else " (no labels: no mAP)")


def bench_bundle(
    path,
    *,
    providers: list[str] | None = None,
    variants: list[str] | None = None,
    modality: str | None = None,
    data: str | os.PathLike | None = None,
    threads: int | None = None,
    cold_runs: int = 3,
    warmup: int = 3,
    repeats: int = 20,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The table (see the module docstring) as ``{"rows": [...], "modality", "data", ...}``."""
    from .bundle import load_bundle
    from .errors import CmhashError
    from .metrics import mean_average_precision

    # the models are read by the measuring processes; here only what the evaluation data needs
    bundle = load_bundle(path, select=lambda b: [
        *(e["file"] for e in b.manifest.get("reference", {}).get("modalities", {}).values()),
        *(b.modality(m)["vocabulary"] for m in b.modalities if b.modality(m).get("vocabulary"))])
    modality = modality or bundle.modalities[0]
    bundle.modality(modality)  # an unknown one says so
    evaluation, described = evaluation_data(bundle, data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cmhash-bench-") as tmp:
        inputs = Path(tmp) / "inputs.npz"
        np.savez(inputs, **{m: evaluation[m] for m in bundle.modalities})
        for plan in plan_rows(bundle, providers, variants):
            if progress:
                progress(f"{plan['variant']} {plan['format']} on {plan['provider']}")
            job = {"bundle": str(path), "threads": threads, "modality": modality, "inputs": str(inputs),
                   "codes": str(Path(tmp) / f"{len(rows)}.npz"), "warmup": warmup, "repeats": repeats, **plan}
            row = dict(plan)
            try:
                row["cold_start_s"] = round(statistics.median(_child(job, cold=True)["cold_start_s"]
                                                              for _ in range(cold_runs)), 3)
                row.update(_child(job, cold=False))
            except CmhashError as exc:  # a provider that cannot run here: the row says why
                row["error"] = str(exc)
            rows.append(row)
        # agreement with fp32 (same provider, ONNX) and mAP, on the codes the children wrote
        codes = {i: _read_codes(r, Path(tmp) / f"{i}.npz") for i, r in enumerate(rows)}
    for i, row in enumerate(rows):
        if codes[i] is None:
            continue
        base = next((codes[j] for j, r in enumerate(rows) if codes[j] is not None and r["variant"] == "fp32"
                     and r["format"] == "onnx" and r["provider"] == row["provider"]), None)
        if base is not None:
            same = [np.unpackbits(codes[i][m] ^ base[m]).mean() for m in bundle.modalities]
            row["bit_agreement"] = round(1 - float(np.mean(same)), 4)
        if "labels" in evaluation and set(bundle.modalities) == {"image", "text"}:
            labels, nq = evaluation["labels"], max(1, len(evaluation["labels"]) // 5)
            img, txt = codes[i]["image"], codes[i]["text"]
            row["map_i2t"] = round(float(mean_average_precision(img[:nq], txt[nq:], labels[:nq], labels[nq:])), 4)
            row["map_t2i"] = round(float(mean_average_precision(txt[:nq], img[nq:], labels[:nq], labels[nq:])), 4)
    import onnxruntime

    return {"bundle": str(path), "fingerprint": bundle.fingerprint, "modality": modality,
            "data": described,
            "items": int(len(evaluation[bundle.modalities[0]])), "threads": threads, "cpu": cpu_name(),
            "onnxruntime": onnxruntime.__version__, "load_average": [round(v, 2) for v in os.getloadavg()],
            "rows": rows}


def baseline_row(rows: list[dict], modality: str) -> dict:
    """A table row from a PyTorch baseline's rows (one per batch size, as
    :func:`summarize` gives them): latency at batch 1, items/s at :data:`THROUGHPUT_BATCH`."""
    one = next(r for r in rows if r["modality"] == modality and r["batch"] == 1)
    many = next(r for r in rows if r["modality"] == modality and r["batch"] == THROUGHPUT_BATCH)
    return {"variant": "fp32", "format": "pytorch", "provider": one["backend"], "p50_ms": one["p50_ms"],
            "p99_ms": one["p99_ms"], "items_per_s": many["items_per_s"]}


def _read_codes(row: dict, path: Path) -> dict | None:
    if "error" in row or not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _child(job: dict, cold: bool) -> dict:
    """Run :func:`_run_job` in a new Python process; its JSON result, with the cold start
    measured from just before the process was started."""
    started = time.time()
    done = subprocess.run([sys.executable, "-c", "import sys; from cmhash.bench import _run_job; _run_job(sys.argv[1])",
                           json.dumps({**job, "cold": cold})], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        from .errors import BackendError

        raise BackendError(lines[-1] if lines else f"exit status {done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if cold:
        result["cold_start_s"] = result.pop("first_code_at") - started
    else:
        result.pop("first_code_at")
    return result


def _run_job(spec: str) -> None:
    """In the child: load, hash one item (the cold start ends here), then, unless only the
    cold start is asked, time the tower and write the codes of the evaluation data."""
    import cmhash

    job = json.loads(spec)
    with np.load(job["inputs"], allow_pickle=False) as z:
        inputs = {k: z[k] for k in z.files}
    encoder = cmhash.Encoder.load(job["bundle"], variant=job["variant"], model_format=job["format"],
                                  providers=[job["provider"]], threads=job["threads"])
    modality = job["modality"]
    encoder.hash_preprocessed(modality, inputs[modality][:1])
    result = {"first_code_at": time.time()}
    if not job["cold"]:
        tower = encoder.backends[modality]
        one = np.ascontiguousarray(inputs[modality][:1])
        many = np.ascontiguousarray(np.resize(inputs[modality], (THROUGHPUT_BATCH, *inputs[modality].shape[1:])))
        latency = time_calls(lambda: tower.run(one), warmup=job["warmup"], repeats=job["repeats"])
        batch = time_calls(lambda: tower.run(many), warmup=1, repeats=max(3, job["repeats"] // 4))
        p50, p99 = np.percentile(latency, [50, 99])
        result.update(mb=round(sum(m["bytes"] for m in encoder.info()["models"].values()) / 1e6, 2),
                      p50_ms=round(p50 * 1e3, 3), p99_ms=round(p99 * 1e3, 3),
                      items_per_s=round(THROUGHPUT_BATCH / float(np.median(batch)), 1),
                      provider_used=encoder.providers[0])
        codes = {m: encoder.hash_preprocessed(m, inputs[m]) for m in encoder.modalities}
        np.savez(job["codes"], **codes)
        result["peak_rss_mb"] = round(_peak_rss_bytes() / 1e6, 1)
    print(json.dumps(result))


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux the high-water mark of its own memory
    (``VmHWM``): ``ru_maxrss`` there survives exec, so a child would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, the others KiB


# --- output ----------------------------------------------------------------------------------------

COLUMNS = [  # (heading, key, format)
    ("variant", "variant", "{}"), ("format", "format", "{}"), ("provider", "provider", "{}"), ("MB", "mb", "{:.1f}"),
    ("cold start s", "cold_start_s", "{:.2f}"), ("peak RSS MB", "peak_rss_mb", "{:.0f}"), ("p50 ms", "p50_ms", "{:.2f}"),
    ("p99 ms", "p99_ms", "{:.2f}"), (f"items/s @{THROUGHPUT_BATCH}", "items_per_s", "{:,.1f}"),
    ("bits = fp32", "bit_agreement", "{:.2%}"), ("mAP I->T", "map_i2t", "{:.4f}"), ("mAP T->I", "map_t2i", "{:.4f}"),
]


def _cells(row: dict) -> list[str]:
    cells = []
    for _, key, fmt in COLUMNS:
        value = row.get(key)
        if key == "provider":
            value = value.removesuffix("ExecutionProvider")
        cells.append("-" if value is None else fmt.format(value))
    if "error" in row:
        cells[3:] = [f"failed: {row['error']}"] + [""] * (len(cells) - 4)
    return cells


def format_table(record: dict, markdown: bool = False) -> str:
    """The rows as an aligned text table or a Markdown table."""
    head = [h for h, _, _ in COLUMNS]
    lines = [head] + [_cells(r) for r in record["rows"]]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|"]
        out += ["| " + " | ".join(cells) + " |" for cells in lines[1:]]
        return "\n".join(out)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)
