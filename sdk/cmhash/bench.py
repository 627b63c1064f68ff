"""Latency and throughput of a bundle's models: ``cmhash bench`` as a library call.

Each (modality, backend, variant, batch size) runs ``warmup`` times, then ``repeats`` timed
times on fixed random inputs of the manifest's shape (model time only: decoding and
preprocessing are not included). Reported: p50/p90/p99 latency per call in milliseconds and
throughput in items per second at the median.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np

DEFAULT_BATCH_SIZES = (1, 8, 32, 128)


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


def bench_bundle(
    path,
    *,
    backends: Iterable[str] = ("onnxruntime",),
    variants: Iterable[str] | None = None,
    modalities: Iterable[str] | None = None,
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    warmup: int = 3,
    repeats: int = 20,
    device: str = "cpu",
    threads: int | None = None,
) -> list[dict]:
    """One row per (modality, backend, variant, batch size); see the module docstring."""
    from .backends import backend_class, default_device
    from .bundle import load_bundle
    from .encoder import Encoder

    bundle = load_bundle(path)
    rows = []
    for backend in backends:
        dev = default_device(backend, device)
        for modality in modalities or bundle.modalities:
            for variant in variants or bundle.variants(modality):
                if variant not in bundle.variants(modality):
                    continue
                if variant not in backend_class(backend).variants:
                    continue
                with Encoder.load(path, backend=backend, device=dev, variant=variant, threads=threads) as enc:
                    shape = tuple(bundle.modality(modality)["input"]["shape"][1:])
                    for batch in batch_sizes:
                        x = example_inputs(shape, batch, modality)
                        model = enc.backends[modality]
                        times = time_calls(lambda: model.run(x), warmup=warmup, repeats=repeats)
                        rows.append({"modality": modality, "backend": backend, "variant": variant, "batch": batch,
                                     **summarize(times, batch)})
    return rows


def add_speedups(rows: list[dict], baseline: str = "pytorch-eager") -> list[dict]:
    """``speedup``: the baseline's p50 over the row's, for the same modality and batch."""
    base = {(r["modality"], r["batch"]): r["p50_ms"] for r in rows if r["backend"] == baseline}
    for r in rows:
        ref = base.get((r["modality"], r["batch"]))
        if ref is not None and r["p50_ms"] > 0:
            r["speedup"] = round(ref / r["p50_ms"], 2)
    return rows


def format_table(rows: list[dict]) -> str:
    head = ["modality", "backend", "variant", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s", "speedup"]
    lines = [head]
    for r in rows:
        lines.append([r["modality"], r["backend"], r["variant"], str(r["batch"]), f"{r['p50_ms']:.3f}",
                      f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['items_per_s']:,.0f}",
                      f"{r['speedup']:.2f}x" if "speedup" in r else "-"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)
