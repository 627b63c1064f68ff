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
    hit = result["example"]
    print(f"\nquery caption: \"{hit['query']}\"\nits 5 nearest images (Hamming distance: their captions):")
    for d, caption in zip(hit["distances"], hit["captions"]):
        print(f"  {d:3d}: {caption}")
    if result.get("checkpoint"):
        print(f"\ncheckpoint: {result['checkpoint']}")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CmhashError as exc:  # expected failures: a message, not a traceback
        print(f"cmhash {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
