"""The ``cmhash demo`` and ``cmhash export`` commands, and the PyTorch baseline of
``cmhash bench --checkpoint``.

They register into the one ``cmhash`` entry point through the ``cmhash.commands`` and
``cmhash.bench_baselines`` groups of pyproject.toml (see :mod:`cmhash.cli`). The demo is
here, in the top layer, because it trains, exports and searches. This module imports only
the runtime and the training CLI at import time, so ``cmhash --help`` lists its commands
where the extras are not installed; each command checks its extra before importing the code.
"""

from __future__ import annotations

import argparse
import sys

from cmhash.cli import positive_int, print_json, require_extra, setup_logging
from cmhash.errors import VerificationError
from cmhash.reference import result_line
from cmhash.training.cli import TRAIN_MODULES, training_run

EXPORT_MODULES = (*TRAIN_MODULES, "onnx")  # import names of the export extra's packages (pyproject.toml)


def add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="train a small EGATH on generated data, evaluate it, export it, search with it")
    demo.add_argument("--out", help="keep the run (checkpoints, metrics, bundle) in this folder")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    training_run()  # the train extra; the export extra is optional here
    from .demo import demo

    quiet = args.json or args.quiet
    setup_logging(quiet)
    result = demo(args.out, progress=not quiet)
    if args.json:
        print_json(result)
        return 0
    print(f"cmhash demo: EGATH ({result['bits']} bits, tiny CLIP ResNet from scratch) trained for "
          f"{result['epochs']} epochs on {result['n_train']} generated images of coloured shapes with captions, "
          f"in {result['train_seconds']:.0f} s.\n{result['n_query']} queries against {result['n_database']} items:\n")
    print(f"  I->T mAP@all   {result['i2t']:.4f}   (image finds captions)")
    print(f"  T->I mAP@all   {result['t2i']:.4f}   (caption finds images)")
    print(f"  random codes   {result['random']:.4f}")
    deployed = result.get("deployed")
    if deployed:
        print(f"\n  through the exported bundle (onnxruntime, raw captions and PIL images, no torch):"
              f"\n  I->T mAP@all   {deployed['i2t']:.4f}\n  T->I mAP@all   {deployed['t2i']:.4f}")
    hit = result["example"]
    print(f"\nquery caption: \"{hit['query']}\"\nits 5 nearest images (Hamming distance: their captions):")
    for d, caption in zip(hit["distances"], hit["captions"]):
        print(f"  {d:3d}: {caption}")
    if result.get("checkpoint"):
        print(f"\ncheckpoint: {result['checkpoint']}")
    if result.get("bundle"):
        print(f"bundle: {result['bundle']}  (cmhash.Encoder.load(...).hash(image))")
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export a checkpoint to a verified bundle (needs cmhash-sdk[export])")
    export.add_argument("checkpoint", help="a checkpoint directory written by training (e.g. runs/x/best)")
    export.add_argument("--out", required=True, help="the bundle directory to write")
    export.add_argument("--fp16", action="store_true", help="also export float16 towers")
    export.add_argument("--int8", action="store_true", help="also export int8 (QDQ) towers, calibrated on real inputs")
    export.add_argument("--int8-dynamic", action="store_true",
                        help="also export fused, dynamically quantised int8 towers (onnxruntime on CPU only)")
    export.add_argument("--ort", action="store_true",
                        help="also write each tower in onnxruntime's ORT format (pre-optimised; for reduced builds)")
    export.add_argument("--tensorrt", action="store_true", help="build and verify TensorRT engines on this GPU")
    export.add_argument("--verify-data", help="folder of images, image list or manifest to verify on (default: the training data)")
    export.add_argument("--calibration-data", help="like --verify-data, for int8 calibration only")
    export.add_argument("--verify-items", type=positive_int, default=256, help="items to verify on (default 256)")
    export.add_argument("--bit-floor", type=float, default=0.97, help="fp16/int8 fail below this bit agreement (0.97)")
    export.add_argument("--strict", action="store_true",
                        help="fail the whole export when any variant fails verification (default: leave it out)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    export.add_argument("--archive", action="store_true", help="also write BUNDLE.zip")
    export.add_argument("--json", action="store_true", help="print the report as JSON")
    export.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    require_extra("export", *EXPORT_MODULES)
    from .api import export_checkpoint

    try:
        report = export_checkpoint(
            args.checkpoint,
            args.out,
            fp16=args.fp16,
            int8=args.int8,
            int8_dynamic=args.int8_dynamic,
            ort=args.ort,
            tensorrt=args.tensorrt,
            verify_data=args.verify_data,
            calibration_data=args.calibration_data,
            verify_items=args.verify_items,
            bit_floor=args.bit_floor,
            strict=args.strict,
            overwrite=args.overwrite,
            archive=args.archive,
        )
        failed = False
    except VerificationError as exc:
        report, failed = exc.report, True
        print(f"cmhash export: error: {exc}", file=sys.stderr)
    if args.json:
        print_json(report)
    else:
        print(f"{'FAILED' if failed else 'exported'} {report['method']} ({report['bits']} bits) from {report['checkpoint']}")
        inputs = report["inputs"]
        print(f"verified on {inputs['image_items']} images and {inputs['text_items']} texts of {inputs['source']}"
              + (f" ({inputs['skipped']} unreadable, skipped)" if inputs["skipped"] else ""))
        for r in report["results"]:
            print(result_line(r))
        for variant, m in report.get("map", {}).items():
            print(f"  mAP {variant:12} I->T {m['i2t']:.4f}  T->I {m['t2i']:.4f}")
        if not failed:
            print(f"bundle: {report['bundle']} ({sum(report['files'].values()) / 1e6:.1f} MB) in {report['seconds']:.1f} s")
            if report["dropped"]:
                print(f"left out (failed verification; --strict fails the export instead): {', '.join(report['dropped'])}")
    return 1 if failed else 0


def bench_baseline(checkpoint, **options) -> list[dict]:
    """The rows of ``cmhash bench``'s PyTorch eager baseline (see :func:`cmhash.export.bench.bench_checkpoint`)."""
    require_extra("export", *TRAIN_MODULES)
    from .bench import bench_checkpoint

    return bench_checkpoint(checkpoint, **options)
