"""Benchmark (not a test): the image tower of a ViT-B/32 CLIP EGATH model, exported to ONNX
and int8, against PyTorch eager on this CPU.

Random weights (nothing is downloaded): timing does not depend on them. Bit agreement of
int8 is measured on real photos, but on an untrained model it says little about a trained
one (whose tanh outputs sit far from 0); ``cmhash export --int8`` gates a trained model.

    python examples/bench_export.py [--threads 2] [--repeats 20] [--photos ../shared/data/mirflickr-mini/images]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cmhash.bench import summarize, time_calls
from cmhash.backends import ModelSpec, create_backend
from cmhash.export import export_tower, quantize_int8
from cmhash.preprocess import ImagePreprocessor, load_image
from cmhash.training.method import DatasetInfo, get_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--photos", default=str(Path(__file__).resolve().parents[2] / "shared/data/mirflickr-mini/images"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cls = get_method("egath")
    config = cls.Config(bits=64, backbone="clip:ViT-B-32")
    info = DatasetInfo(n_train=1, n_labels=24, text_dim=1386, train_labels=torch.zeros(1, 24))
    tower = cls(config, info).image_tower().eval()
    pre = ImagePreprocessor.from_dict(cls.image_preprocessing(config))
    photos = sorted(Path(args.photos).glob("*.jpg"))[: args.calibration + 64]
    pixels = np.stack([pre.transform(load_image(p)) for p in photos])
    calibration, verify = pixels[: args.calibration], pixels[args.calibration :]

    started = time.perf_counter()
    fp32 = export_tower(tower, torch.from_numpy(verify[:2]), "pixel_values", 64, "image")
    export_s = time.perf_counter() - started
    started = time.perf_counter()
    int8, info8 = quantize_int8(fp32, "pixel_values", calibration, "image")
    quant_s = time.perf_counter() - started
    spec = ModelSpec("image", "pixel_values", ("batch", 3, *pre.output_size), "codes", 64)

    rows = []
    with torch.inference_mode():
        reference = np.concatenate([tower(torch.from_numpy(verify[i : i + 16])).numpy() for i in range(0, len(verify), 16)])
    for batch in (1, 32):
        x = pixels[:batch]
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            times = time_calls(lambda: tower(xt), warmup=2, repeats=args.repeats if batch == 1 else max(3, args.repeats // 4))
        rows.append({"backend": "pytorch-eager", "variant": "fp32", "batch": batch, **summarize(times, batch)})
        for variant, model in (("fp32", fp32), ("int8", int8)):
            backend = create_backend("onnxruntime", model, spec, threads=args.threads, variant=variant)
            times = time_calls(lambda: backend.run(x), warmup=2, repeats=args.repeats if batch == 1 else max(3, args.repeats // 4))
            row = {"backend": "onnxruntime", "variant": variant, "batch": batch, **summarize(times, batch)}
            if batch == 1:
                out = np.concatenate([backend.run(verify[i : i + 16]) for i in range(0, len(verify), 16)])
                row["bit_agreement_vs_pytorch"] = round(float(((out >= 0) == (reference >= 0)).mean()), 4)
                row["max_abs_delta"] = float(np.abs(out - reference).max())
            rows.append(row)
    base = {r["batch"]: r["p50_ms"] for r in rows if r["backend"] == "pytorch-eager"}
    for r in rows:
        r["speedup_vs_eager"] = round(base[r["batch"]] / r["p50_ms"], 2)
    print(json.dumps({"model": "EGATH image tower, CLIP ViT-B/32 (random weights), 224 px, 64 bits",
                      "cpu": platform.processor() or platform.machine(), "threads": args.threads,
                      "torch": torch.__version__, "onnx_mb": round(len(fp32) / 1e6, 1), "int8_mb": round(len(int8) / 1e6, 1),
                      "export_s": round(export_s, 1), "quantize_s": round(quant_s, 1), "int8": info8, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
