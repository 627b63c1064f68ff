"""Benchmark (not a test): the image tower of a ViT-B/32 CLIP EGATH model, exported to ONNX
(fp32, QDQ int8, int8-dynamic), against PyTorch eager on this CPU.

Random weights (nothing is downloaded): timing does not depend on them. Bit agreement is
measured on real photos, but on an untrained model it says little about a trained one (whose
tanh outputs sit far from 0); ``cmhash export`` gates a trained model.

Every runner is timed in the same process on the same input, interleaved (one call of each
per round), so load from other processes hits all of them alike; the table gives the best
of the rounds and the median, and speedups against eager for both.

    python examples/bench_export.py [--threads 1 2] [--rounds 30] [--photos DIR]

Needs the export extra (torch, open_clip, onnx) and a folder of at least --calibration + 2
.jpg photos (default: mirflickr-mini/images in the data folder beside the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from cmhash.cli import exit_without_extra

exit_without_extra("export", "torch", "open_clip", "onnx", "onnxscript")

import torch  # noqa: E402

from cmhash.backends import ModelSpec, create_backend  # noqa: E402
from cmhash.export import export_tower, quantize_int8, quantize_int8_dynamic  # noqa: E402
from cmhash.preprocess import ImagePreprocessor  # noqa: E402
from cmhash.training.method import DatasetInfo, get_method  # noqa: E402


def interleaved(runners: dict, rounds: int) -> dict[str, np.ndarray]:
    for run in runners.values():  # warm-up
        run()
        run()
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: np.asarray(t) * 1000 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds at batch 1 (a quarter at batch 32)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--backbone", default="clip:ViT-B-32",
                        help="the EGATH image backbone (clip:tiny-resnet: a smoke run in seconds)")
    parser.add_argument("--photos", default=str(Path(__file__).resolve().parents[2] / "shared/data/mirflickr-mini/images"))
    args = parser.parse_args()
    photos = sorted(Path(args.photos).glob("*.jpg"))[: args.calibration + 64]
    if len(photos) < args.calibration + 2:
        parser.error(f"--photos {args.photos}: {len(photos)} .jpg photos there; give a folder with at least "
                     f"{args.calibration + 2} (--calibration + 2)")
    torch.manual_seed(0)

    cls = get_method("egath")
    config = cls.Config(bits=64, backbone=args.backbone)
    info = DatasetInfo(n_train=1, n_labels=24, text_dim=1386, train_labels=torch.zeros(1, 24))
    tower = cls(config, info).image_tower().eval()
    pre = ImagePreprocessor.from_dict(cls.image_preprocessing(config))
    pixels = np.stack([pre.pixels(p) for p in photos])
    calibration, verify = pixels[: args.calibration], pixels[args.calibration :]

    seconds, models, notes = {}, {}, {}
    started = time.perf_counter()
    models["fp32"] = export_tower(tower, torch.from_numpy(verify[:2]), "pixel_values", 64, "image")
    seconds["export"] = time.perf_counter() - started
    started = time.perf_counter()
    models["int8"], notes["int8"] = quantize_int8(models["fp32"], "pixel_values", calibration, "image")
    seconds["int8"] = time.perf_counter() - started
    started = time.perf_counter()
    models["int8-dynamic"], notes["int8-dynamic"] = quantize_int8_dynamic(models["fp32"], "image")
    seconds["int8-dynamic"] = time.perf_counter() - started
    spec = ModelSpec("image", "pixel_values", ("batch", 3, *pre.output_size), "codes", 64)

    with torch.inference_mode():
        reference = np.concatenate([tower(torch.from_numpy(verify[i : i + 16])).numpy() for i in range(0, len(verify), 16)])
    agreement = {}
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        backends = {v: create_backend("onnxruntime", m, spec, threads=threads, variant=v) for v, m in models.items()}
        if threads == args.threads[0]:
            for v, backend in backends.items():
                out = np.concatenate([backend.run(verify[i : i + 16]) for i in range(0, len(verify), 16)])
                agreement[v] = {"bit_agreement_vs_pytorch": round(float(((out >= 0) == (reference >= 0)).mean()), 4),
                                "max_abs_delta": float(np.abs(out - reference).max())}
        for batch in args.batches:
            x = np.ascontiguousarray(pixels[:batch])
            xt = torch.from_numpy(x)
            runners = {"pytorch-eager": lambda: tower(xt)}
            runners.update({v: (lambda b=b: b.run(x)) for v, b in backends.items()})
            with torch.inference_mode():
                times = interleaved(runners, args.rounds if batch == 1 else max(3, args.rounds // 4))
            eager = times["pytorch-eager"]
            for name, t in times.items():
                rows.append({"threads": threads, "batch": batch, "runner": name,
                             "best_ms": round(float(t.min()), 1), "p50_ms": round(float(np.median(t)), 1),
                             "speedup_best": round(float(eager.min() / t.min()), 2),
                             "speedup_p50": round(float(np.median(eager) / np.median(t)), 2)})
        for backend in backends.values():
            backend.close()
    import onnxruntime

    print(json.dumps({
        "model": f"EGATH image tower, {args.backbone} (random weights), {pre.output_size[0]} px, 64 bits",
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "mb": {v: round(len(m) / 1e6, 1) for v, m in models.items()},
        "seconds": {k: round(v, 1) for k, v in seconds.items()}, "notes": notes,
        "agreement_untrained": agreement, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
