"""Benchmark (not a test): decoding is part of latency. ``cmhash encode`` on camera-sized
JPEGs (12 MP) against the model alone on the same bundle, and what reduced JPEG decoding
(``load_image(min_side=...)``, DCT scaling) saves and changes.

The bundle holds the image tower of a ViT-B/32 CLIP EGATH model with random weights
(nothing is downloaded), exported to ONNX and quantised to int8-dynamic. The photos are
real (mirflickr-mini thumbnails), upscaled to --size with a little noise added, so that
they compress like camera photos (a few MB each); they live in a temporary folder.

Prints, for one run:
- ``cmhash encode`` images/s (library call: decode threads + model), the model alone
  (``Encoder.hash_preprocessed`` on the same number of preprocessed images, same batch
  size) items/s, and their ratio;
- the CPU time per item of both (this process's): on a loaded machine their ratio says more
  than the wall-clock one, and on a machine with as many cores as model threads it bounds it;
- decode + preprocess images/s on one thread, full decoding against reduced decoding;
- how much reduced decoding changes the model input: max and mean absolute difference of
  the resized 8-bit pixels, and the bit agreement of the codes.

    python examples/bench_decode.py [--threads 2] [--workers 2] [--images 160] [--size 4000x3000]
    python examples/bench_decode.py --backbone clip:tiny-resnet --images 8   # smoke run

Needs the export extra (torch, open_clip, onnx) and the photos (default: mirflickr-mini/
images in $CMHASH_TEST_DATA, else in the data folder beside the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from cmhash.cli import exit_without_extra
from cmhash.cpus import cpu_name

exit_without_extra("export", "torch", "open_clip", "onnx", "onnxscript")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cmhash.bundle import image_modality, write_bundle  # noqa: E402
from cmhash.encoder import Encoder  # noqa: E402
from cmhash.export import export_tower, quantize_int8_dynamic  # noqa: E402
from cmhash.offline import encode_collection  # noqa: E402
from cmhash.preprocess import ImagePreprocessor, load_image  # noqa: E402
from cmhash.training.method import DatasetInfo, get_method  # noqa: E402

BITS = 64


def make_bundle(directory: Path, backbone: str, photos: list[Path]) -> ImagePreprocessor:
    """An EGATH image tower with random weights as an fp32 + int8-dynamic bundle."""
    torch.manual_seed(0)
    cls = get_method("egath")
    config = cls.Config(bits=BITS, backbone=backbone)
    info = DatasetInfo(n_train=1, n_labels=24, text_dim=1386, train_labels=torch.zeros(1, 24))
    tower = cls(config, info).image_tower().eval()
    pre = ImagePreprocessor.from_dict(cls.image_preprocessing(config))
    example = torch.from_numpy(np.stack([pre.pixels(p) for p in photos[:2]]))
    fp32 = export_tower(tower, example, "pixel_values", BITS, "image")
    int8, _ = quantize_int8_dynamic(fp32, "image")
    modality = image_modality("image.onnx", pre)
    modality["variants"] = {"int8-dynamic": {"file": "image.int8-dynamic.onnx"}}
    manifest = {"method": "egath", "bits": BITS, "modalities": {"image": modality}, "label_names": ["a", "b"],
                "provenance": {"training_config": {"backbone": backbone, "weights": "random"}}}
    write_bundle(directory, manifest, {"image.onnx": fp32, "image.int8-dynamic.onnx": int8})
    return pre


def make_camera_jpegs(photos: list[Path], folder: Path, size: tuple[int, int], count: int) -> list[Path]:
    """Real photos upscaled to camera size, with mild noise so that they compress like one."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(count):
        image = load_image(photos[k % len(photos)]).resize(size, Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 3, (size[1], size[0], 1)).astype(np.int16)
        path = folder / f"camera-{k:04d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=92)
        out.append(path)
    return out


def per_second(count: int, fn, cpu: list | None = None) -> float:
    """Items per wall second; appends this process's CPU milliseconds per item to ``cpu``."""
    started, cpu_started = time.perf_counter(), time.process_time()
    fn()
    if cpu is not None:
        cpu.append((time.process_time() - cpu_started) * 1000 / count)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="model threads (onnxruntime)")
    parser.add_argument("--workers", type=int, default=2, help="cmhash encode decoding threads")
    # The first batch's decoding never overlaps the model: with few batches it weighs on the ratio.
    parser.add_argument("--images", type=int, default=160, help="camera-sized JPEGs to encode")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--backbone", default="clip:ViT-B-32",
                        help="the EGATH image backbone (clip:tiny-resnet: a smoke run)")
    data = Path(os.environ.get("CMHASH_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared/data")
    parser.add_argument("--photos", default=str(data / "mirflickr-mini/images"))
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    photos = sorted(Path(args.photos).glob("*.jpg"))
    if len(photos) < 2:
        parser.error(f"--photos {args.photos}: need at least 2 .jpg photos there")
    load_start = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="cmhash-bench-decode-") as tmp:
        tmp = Path(tmp)
        pre = make_bundle(tmp / "bundle", args.backbone, photos)
        (tmp / "photos").mkdir()
        files = make_camera_jpegs(photos, tmp / "photos", (width, height), args.images)
        megabytes = sum(p.stat().st_size for p in files) / len(files) / 1e6

        # decode + preprocess on one thread: full decoding, then reduced (the shipped path)
        full_px = [pre.transform(load_image(p)) for p in files[:2]]  # warm-up
        full_rate = per_second(len(files), lambda: full_px.extend(pre.transform(load_image(p)) for p in files))
        full_px = np.stack(full_px[2:])
        reduced_rate = per_second(len(files), lambda: [pre.pixels(p) for p in files])
        reduced_px = np.stack([pre.pixels(p) for p in files])
        full_u8 = np.stack([np.asarray(pre.resize_and_crop(load_image(p)), np.int16) for p in files])
        reduced_u8 = np.stack([np.asarray(pre.resize_and_crop(pre.decode(p)), np.int16) for p in files])
        diff = np.abs(full_u8 - reduced_u8)

        with Encoder.load(tmp / "bundle", variant="int8-dynamic", threads=args.threads) as encoder:
            codes_full = encoder.hash_preprocessed("image", full_px)
            codes_reduced = encoder.hash_preprocessed("image", reduced_px)
            bits_full = np.unpackbits(codes_full, axis=1)
            bits_reduced = np.unpackbits(codes_reduced, axis=1)
            agreement = float((bits_full == bits_reduced).mean())

            def model_only():
                for start in range(0, len(reduced_px), args.batch):
                    encoder.hash_preprocessed("image", reduced_px[start : start + args.batch])

            model_only()  # warm-up
            model_cpu, encode_cpu = [], []
            model_rate = per_second(len(files), model_only, model_cpu)
            encode_rate = per_second(len(files), lambda: encode_collection(
                tmp / "bundle", tmp / "photos", tmp / "out", batch_size=args.batch, workers=args.workers,
                encoder=encoder, progress=None), encode_cpu)
            model_rate_after = per_second(len(files), model_only, model_cpu)  # the load may have changed meanwhile
        model_rate = max(model_rate, model_rate_after)

    ratio = encode_rate / model_rate
    print(json.dumps({
        "cpu": cpu_name(), "cores": os.cpu_count(),
        "load_average": {"start": round(load_start, 1), "end": round(os.getloadavg()[0], 1)},
        "model": f"EGATH image tower, {args.backbone} (random weights), int8-dynamic, {pre.output_size[0]} px, {BITS} bits",
        "images": f"{len(files)} JPEGs {width}x{height}, {megabytes:.1f} MB each on average",
        "threads": args.threads, "workers": args.workers, "batch": args.batch,
        "encode_images_per_s": round(encode_rate, 2),
        "model_only_items_per_s": round(model_rate, 2),
        "encode_over_model": round(ratio, 3),
        "cpu_ms_per_item": {"model_only": round(min(model_cpu), 1), "encode": round(encode_cpu[0], 1),
                            "model_over_encode": round(min(model_cpu) / encode_cpu[0], 3)},
        "decode_preprocess_1_thread_images_per_s": {"full": round(full_rate, 2), "reduced": round(reduced_rate, 2),
                                                    "speedup": round(reduced_rate / full_rate, 2)},
        "reduced_vs_full": {"max_abs_diff_8bit": int(diff.max()), "mean_abs_diff_8bit": round(float(diff.mean()), 3),
                            "code_bit_agreement": round(agreement, 4)},
    }, indent=1))
    print(f"cmhash encode: {encode_rate:.2f} images/s; model only: {model_rate:.2f} items/s; ratio {ratio:.2f} "
          f"(target >= 0.80: {'ok' if ratio >= 0.8 else 'MISS'})")


if __name__ == "__main__":
    main()
