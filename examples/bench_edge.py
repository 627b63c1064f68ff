"""Benchmark bundle (not a test): an EGATH model with a ViT-B/32 image tower and random
weights (nothing is downloaded), exported by the real export path with every variant and
its ORT-format copies, then measured by ``cmhash bench`` (size, cold start, peak memory,
latency, throughput, bit agreement with fp32, mAP).

    python examples/bench_edge.py --out /tmp/vitb32 [--bench] [--cold-runs 5]

Random weights put many tanh outputs near 0, so the reduced-precision variants agree with
fp32 on fewer bits than a trained model's would; the export floor is lowered to
``--bit-floor`` (default 0.5) so that every variant is written and measured. Timing does
not depend on the weights. Verification and mAP use the photos, tags and labels of
mirflickr-mini (``--data``, default: in ``$CMHASH_TEST_DATA`` or the data folder beside the
repository).

Needs the export extra (torch, open_clip, onnx).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cmhash.cli import exit_without_extra

exit_without_extra("export", "torch", "open_clip", "onnx", "onnxscript")

import torch  # noqa: E402

from cmhash.cli import main as cmhash_main  # noqa: E402
from cmhash.export import export_checkpoint  # noqa: E402
from cmhash.export.loading import Trained  # noqa: E402
from cmhash.training.method import DatasetInfo, get_method  # noqa: E402

DATA = Path(os.environ.get("CMHASH_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared/data") / "mirflickr-mini"


def random_weights_model(backbone: str, bits: int, label_names: list[str], text_dim: int) -> Trained:
    """An untrained EGATH, wrapped as the export reads a checkpoint."""
    torch.manual_seed(0)
    cls = get_method("egath")
    config = cls.Config(bits=bits, backbone=backbone)
    info = DatasetInfo(n_train=1, n_labels=len(label_names), text_dim=text_dim,
                       train_labels=torch.zeros(1, len(label_names)), label_names=label_names)
    method = cls(config, info)
    meta = {"method": "egath", "bits": bits, "text_dim": text_dim, "label_names": label_names,
            "preprocessing": cls.image_preprocessing(config), "config": {"backbone": backbone, "weights": "random"},
            "epoch": 0}
    return Trained(path=Path(f"random-weights-egath-{backbone}"), meta=meta, method=method)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the bundle folder to write")
    parser.add_argument("--backbone", default="clip:ViT-B-32", help="EGATH image backbone (clip:tiny-resnet: seconds)")
    parser.add_argument("--data", default=str(DATA), help="mirflickr-mini folder (manifest.jsonl, label_names.txt)")
    parser.add_argument("--items", type=int, default=64, help="verification items (default 64)")
    parser.add_argument("--bit-floor", type=float, default=0.5, help="export floor for reduced precision (0.5)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--bench", action="store_true", help="then run cmhash bench on the bundle (--markdown)")
    parser.add_argument("--cold-runs", type=int, default=5, help="cold starts per row for --bench (default 5)")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "manifest.jsonl").is_file():
        parser.error(f"--data {data}: no manifest.jsonl there")
    label_names = (data / "label_names.txt").read_text().split()
    trained = random_weights_model(args.backbone, 64, label_names, 1386)
    torch.set_num_threads(2)
    report = export_checkpoint(trained, args.out, fp16=True, int8=True, int8_dynamic=True, ort=True,
                               verify_data=data / "manifest.jsonl", verify_items=args.items,
                               calibration_items=min(args.items, 64), bit_floor=args.bit_floor,
                               overwrite=args.overwrite)
    print(f"{args.out}: {', '.join(report['variants'])}; ORT: {', '.join(report['ort']['variants'])}; "
          f"left out: {report['dropped'] or 'none'}; {report['seconds']:.0f} s", file=sys.stderr)
    if args.bench:
        return cmhash_main(["bench", args.out, "--markdown", "--cold-runs", str(args.cold_runs)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
