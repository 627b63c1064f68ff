"""The ``cmhash`` command line: one entry point, a subcommand per library call.

``main(argv)`` takes its arguments as a list, so tests call it directly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .cpus import quiet_openmp_waits
from .errors import CmhashError


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _load_codes(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Packed codes (and ids, if present) from a ``.npy`` array or an ``.npz`` with
    ``codes`` [and ``ids``] - what ``cmhash encode`` writes."""
    p = Path(path)
    if not p.is_file():
        raise CmhashError(f"{path}: no such file; give a .npy of packed uint8 codes or an .npz with 'codes'")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            if "codes" not in z:
                raise CmhashError(f"{path}: the .npz has no 'codes' array (it has {sorted(z.files)})")
            return z["codes"], (z["ids"] if "ids" in z else None)
    return np.load(p, allow_pickle=False), None


def _training():
    """cmhash.training.run, or a clear error when the training extra is not installed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise CmhashError("this command trains or runs PyTorch models and needs the training extra: "
                          "pip install 'cmhash-sdk[train]'") from None
    import warnings

    # open_clip scripts a helper at import; torch 2.14 warns about that on every run
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
    from cmhash.training import run

    return run


def _data_spec(text: str) -> dict:
    """--query / --database: a manifest (.jsonl/.csv) or a YAML file holding a data section."""
    path = Path(text)
    if path.suffix in (".jsonl", ".csv"):
        return {"source": "manifest", "path": str(path)}
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            spec = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CmhashError(f"{text}: cannot read a data section from it ({exc})") from None
        if not isinstance(spec, dict) or "source" not in spec:
            raise CmhashError(f"{text}: a data file must be a mapping with a 'source' key (like a config's data section)")
        return spec
    raise CmhashError(f"{text}: give a manifest (.jsonl, .csv) or a YAML data section (.yaml)")


def _setup_logging(quiet: bool) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")


def cmd_train(args) -> int:
    run = _training()
    _setup_logging(args.json)
    config = run.load_config(run.resolve_config(args.config), args.overrides)
    result = run.train(config)
    summary = {"out_dir": str(result.out_dir), "best": result.best,
               "last": {k: v for k, v in result.last.items() if k.startswith(("epoch", "map_"))}}
    if args.json:
        _print_json(summary)
    else:
        best = result.best or {}
        print(f"trained {config.method} for {config.train.epochs} epochs; checkpoints in {result.out_dir}/best and /last")
        if best:
            print(f"best epoch {best['epoch']}: I->T mAP {best['map_i2t']:.4f}, T->I mAP {best['map_t2i']:.4f}")
    return 0


def cmd_eval(args) -> int:
    run = _training()
    if (args.query is None) != (args.database is None):
        raise CmhashError("give both --query and --database, or neither (the training run's own split)")
    query = _data_spec(args.query) if args.query else None
    database = _data_spec(args.database) if args.database else None
    result = run.evaluate(args.checkpoint, query=query, database=database)
    if args.json:
        _print_json(result)
        return 0
    print(f"{args.checkpoint}: {result['n_query']} queries against {result['n_database']} items, {result['bits']} bits")
    for name, title in (("i2t", "I->T"), ("t2i", "T->I")):
        r = result[name]
        extra = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "map")
        print(f"  {title} mAP {r['map']:.4f}  {extra}")
    return 0


def cmd_demo(args) -> int:
    run = _training()
    _setup_logging(True)
    result = run.demo(args.out, progress=not args.json)
    if args.json:
        _print_json(result)
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


def cmd_index(args) -> int:
    from .index import HashIndex

    if args.index_cmd == "build":
        codes, ids = _load_codes(args.codes)
        index = HashIndex(codes.shape[1] * 8 if codes.ndim == 2 else 8 * codes.shape[0])
        index.add(codes, ids)
        index.save(args.out)
        info = {"path": args.out, "count": len(index), "bits": index.bits}
    else:
        index = HashIndex.load(args.index, mmap=True)
        info = {"path": args.index, "count": len(index), "bits": index.bits}
    if args.json:
        _print_json(info)
    else:
        print(f"{info['path']}: {info['count']} codes of {info['bits']} bits")
    return 0


def cmd_search(args) -> int:
    from .index import HashIndex

    index = HashIndex.load(args.index, mmap=True)
    queries, _ = _load_codes(args.queries)
    t0 = time.perf_counter()
    dist, ids = index.search(queries, args.k)
    seconds = time.perf_counter() - t0
    if args.json:
        _print_json({"distances": dist.tolist(), "ids": ids.tolist(), "seconds": seconds})
        return 0
    for qi in range(len(ids)):
        print(f"query {qi}: " + ", ".join(f"{i} ({d})" for i, d in zip(ids[qi], dist[qi]) if i >= 0))
    print(f"{len(ids)} queries, k={args.k}, {seconds * 1e3:.2f} ms", file=sys.stderr)
    return 0


EXPORT_HINT = 'this needs the export extra (torch, onnx): pip install "cmhash-sdk[export]"'


def _require_export():
    """cmhash.export, or a clear message naming the extra when torch or onnx is missing."""
    missing = []
    for name in ("torch", "onnx"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise CmhashError(f"{' and '.join(missing)} not installed; {EXPORT_HINT}")
    import cmhash.export

    return cmhash.export


def cmd_export(args) -> int:
    export = _require_export()
    try:
        report = export.export_checkpoint(
            args.checkpoint,
            args.out,
            fp16=args.fp16,
            int8=args.int8,
            int8_dynamic=args.int8_dynamic,
            tensorrt=args.tensorrt,
            verify_data=args.verify_data,
            calibration_data=args.calibration_data,
            verify_items=args.verify_items,
            bit_floor=args.bit_floor,
            overwrite=args.overwrite,
            archive=args.archive,
        )
        failed = False
    except export.VerificationError as exc:
        report, failed = exc.report, True
        print(f"cmhash export: error: {exc}", file=sys.stderr)
    if args.json:
        _print_json(report)
    else:
        print(f"{'FAILED' if failed else 'exported'} {report['method']} ({report['bits']} bits) from {report['checkpoint']}")
        inputs = report["inputs"]
        print(f"verified on {inputs['image_items']} images and {inputs['text_items']} texts of {inputs['source']}"
              + (f" ({inputs['skipped']} unreadable, skipped)" if inputs["skipped"] else ""))
        for r in report["results"]:
            print(f"  {r['modality']:5} {r['variant']:12} {r['backend']:11}  bits {r['bit_agreement']:.4%}  "
                  f"max|d| {r['max_abs_delta']:.2e}  {'ok' if r['passed'] else 'FAIL (' + r['criterion'] + ')'}")
        for variant, m in report.get("map", {}).items():
            print(f"  mAP {variant:12} I->T {m['i2t']:.4f}  T->I {m['t2i']:.4f}")
        if not failed:
            print(f"bundle: {report['bundle']} ({sum(report['files'].values()) / 1e6:.1f} MB) in {report['seconds']:.1f} s")
    return 1 if failed else 0


def cmd_encode(args) -> int:
    from .offline import Progress, encode_collection

    summary = encode_collection(
        args.bundle,
        args.input,
        args.out,
        modality=args.modality,
        batch_size=args.batch_size,
        workers=args.workers,
        shard=args.shard,
        resume=args.resume,
        chunk_size=args.chunk_size,
        variant=args.variant,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        progress=None if args.json else Progress(),
    )
    if args.json:
        _print_json(summary)
    else:
        print(f"{summary['encoded']} of {summary['items']} items encoded into {summary['codes']}; "
              f"{summary['errors']} unreadable (listed in {summary['errors_file']}); "
              f"{summary['items_per_second']:,.1f} items/s")
    return 0


def cmd_bench(args) -> int:
    from .bench import add_speedups, bench_bundle, format_table
    from .bundle import load_bundle

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    backends = ["onnxruntime"]
    if args.tensorrt:
        backends.append("tensorrt")
    else:
        from .backends.tensorrt_backend import tensorrt_available

        if tensorrt_available()[0]:
            backends.append("tensorrt")
    common = dict(batch_sizes=batch_sizes, warmup=args.warmup, repeats=args.repeats)
    rows = []
    checkpoint = args.checkpoint
    if checkpoint is None:
        saved = load_bundle(args.bundle).manifest.get("provenance", {}).get("checkpoint", {}).get("path")
        checkpoint = saved if saved and Path(saved).exists() else None
    baseline = "no checkpoint given" if checkpoint is None else None
    if checkpoint is not None:
        try:
            _require_export()
        except CmhashError as exc:
            baseline = str(exc)
        else:
            from cmhash.export.bench import bench_checkpoint

            try:
                rows += bench_checkpoint(checkpoint, threads=args.threads, **common)
            except CmhashError as exc:
                baseline = str(exc)
    rows += bench_bundle(args.bundle, backends=backends, threads=args.threads, **common)
    add_speedups(rows)
    import platform

    record = {"bundle": args.bundle, "checkpoint": checkpoint, "machine": platform.processor() or platform.machine(),
              "threads": args.threads, "rows": rows}
    if baseline:
        record["pytorch_baseline"] = f"skipped: {baseline}"
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    if args.json:
        _print_json(record)
    else:
        print(format_table(rows))
        if baseline:
            print(f"(PyTorch eager baseline skipped: {baseline})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmhash", description="Cross-modal deep hashing toolkit.")
    parser.add_argument("--version", action="version", version=f"cmhash {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small EGATH on generated data, evaluate it, search with it")
    demo.add_argument("--out", help="keep the run (checkpoints, metrics) in this folder")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="a YAML file, or a shipped config such as egath/demo or egath/mirflickr25k-64")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3 model.bits=32")
    train.add_argument("--json", action="store_true", help="print one JSON object at the end")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="I->T and T->I metrics of a trained checkpoint")
    evaluate.add_argument("checkpoint", help="a checkpoint folder (run/best, run/last) or a run folder")
    evaluate.add_argument("--query", help="query data: a manifest (.jsonl/.csv) or a YAML data section")
    evaluate.add_argument("--database", help="database data, the same forms as --query")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    index = sub.add_parser("index", help="build or inspect a HashIndex file")
    isub = index.add_subparsers(dest="index_cmd", required=True)
    build = isub.add_parser("build", help="index packed codes from .npy / .npz (codes [, ids])")
    build.add_argument("codes")
    build.add_argument("--out", required=True)
    build.add_argument("--json", action="store_true")
    info = isub.add_parser("info", help="count and bit length of an index file")
    info.add_argument("index")
    info.add_argument("--json", action="store_true")
    index.set_defaults(func=cmd_index)

    search = sub.add_parser("search", help="k nearest codes of each query in an index")
    search.add_argument("index")
    search.add_argument("queries", help=".npy of packed uint8 codes or .npz with 'codes'")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=cmd_search)

    export = sub.add_parser("export", help="export a checkpoint to a verified bundle (needs cmhash-sdk[export])")
    export.add_argument("checkpoint", help="a checkpoint directory written by training (e.g. runs/x/best)")
    export.add_argument("--out", required=True, help="the bundle directory to write")
    export.add_argument("--fp16", action="store_true", help="also export float16 towers")
    export.add_argument("--int8", action="store_true", help="also export int8 (QDQ) towers, calibrated on real inputs")
    export.add_argument("--int8-dynamic", action="store_true",
                        help="also export fused, dynamically quantised int8 towers (onnxruntime on CPU only)")
    export.add_argument("--tensorrt", action="store_true", help="build and verify TensorRT engines on this GPU")
    export.add_argument("--verify-data", help="folder of images, image list or manifest to verify on (default: the training data)")
    export.add_argument("--calibration-data", help="like --verify-data, for int8 calibration only")
    export.add_argument("--verify-items", type=int, default=256, help="items to verify on (default 256)")
    export.add_argument("--bit-floor", type=float, default=0.97, help="fp16/int8 fail below this bit agreement (0.97)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    export.add_argument("--archive", action="store_true", help="also write BUNDLE.zip")
    export.add_argument("--json", action="store_true", help="print the report as JSON")
    export.set_defaults(func=cmd_export)

    encode = sub.add_parser("encode", help="hash a folder, file list or manifest into codes + ids (resumable)")
    encode.add_argument("bundle")
    encode.add_argument("input", help="folder, file list (one path or text per line) or manifest (.jsonl/.csv)")
    encode.add_argument("--out", required=True, help="output folder (codes.npz, errors.jsonl, summary.json)")
    encode.add_argument("--modality", choices=["image", "text"], help="default: image when the bundle has it")
    encode.add_argument("--batch-size", type=int, default=32)
    encode.add_argument("--workers", type=int, default=4, help="decoding threads (default 4)")
    encode.add_argument("--shard", default="0/1", help="i/N: encode every N-th item from the i-th (default 0/1)")
    encode.add_argument("--resume", action="store_true", help="continue a killed or finished job in --out")
    encode.add_argument("--chunk-size", type=int, default=1024, help="items per resumable part (default 1024)")
    encode.add_argument("--variant", default="fp32", choices=["fp32", "fp16", "int8", "int8-dynamic"])
    encode.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    encode.add_argument("--device", default="cpu")
    encode.add_argument("--threads", type=int, help="onnxruntime threads")
    encode.add_argument("--json", action="store_true", help="print the summary as JSON (no progress line)")
    encode.set_defaults(func=cmd_encode)

    bench = sub.add_parser("bench", help="latency p50/p90/p99 and throughput per backend, precision and batch size")
    bench.add_argument("bundle")
    bench.add_argument("--checkpoint", help="PyTorch eager baseline from this checkpoint (default: the bundle's own, if present)")
    bench.add_argument("--batch-sizes", default="1,8,32,128")
    bench.add_argument("--repeats", type=int, default=20)
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--threads", type=int, help="CPU threads for onnxruntime and torch")
    bench.add_argument("--tensorrt", action="store_true", help="require TensorRT rows (default: when available)")
    bench.add_argument("--out", help="also write the JSON record here")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_openmp_waits()  # before a command that trains or exports imports torch and its OpenMP runtime
    try:
        return args.func(args)
    except (CmhashError, FileExistsError, FileNotFoundError) as exc:  # expected failures: a message, not a traceback
        print(f"cmhash {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
