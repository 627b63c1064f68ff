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


def _demo_codes(n_items: int, n_labels: int, bits: int, noise: float, rng: np.random.Generator):
    """Multi-label items and two 'modalities' of codes that both derive from the labels
    through one shared random projection, each with its own noise: what a trained
    cross-modal hasher produces, in miniature."""
    labels = (rng.random((n_items, n_labels)) < 2.0 / n_labels).astype(np.uint8)
    empty = labels.sum(1) == 0
    labels[empty, rng.integers(0, n_labels, empty.sum())] = 1
    projection = rng.standard_normal((n_labels, bits))
    signal = labels @ projection
    image = signal + noise * rng.standard_normal(signal.shape)
    text = signal + noise * rng.standard_normal(signal.shape)
    return labels, image, text


def cmd_demo(args) -> int:
    from .codes import pack_codes
    from .index import HashIndex
    from .metrics import mean_average_precision

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    labels, image, text = _demo_codes(args.items, 24, args.bits, 1.5, rng)
    image_codes, text_codes = pack_codes(image), pack_codes(text)
    n_query = args.items // 10
    q, db = slice(0, n_query), slice(n_query, None)

    index = HashIndex(args.bits)
    index.add(text_codes[db])
    dist, ids = index.search(image_codes[q], 10)
    first_hit_shares_label = float(np.mean((labels[q] & labels[db][ids[:, 0]]).any(1)))

    i2t = mean_average_precision(image_codes[q], text_codes[db], labels[q], labels[db])
    t2i = mean_average_precision(text_codes[q], image_codes[db], labels[q], labels[db])
    random_codes = rng.integers(0, 256, size=text_codes.shape, dtype=np.uint8)
    rand = mean_average_precision(random_codes[q], random_codes[db], labels[q], labels[db])
    seconds = time.perf_counter() - t0

    result = {
        "what": "generated label-correlated codes (no training yet): index, search, mAP",
        "items": args.items,
        "queries": n_query,
        "bits": args.bits,
        "i2t": round(float(i2t), 4),
        "t2i": round(float(t2i), 4),
        "random": round(float(rand), 4),
        "top1_shares_label": round(first_hit_shares_label, 4),
        "seconds": round(seconds, 3),
    }
    if args.json:
        _print_json(result)
        return 0
    print(
        f"cmhash demo: {args.items} generated items with 24 labels; 'image' and 'text' codes of "
        f"{args.bits} bits derive from the labels through one shared projection plus noise\n"
        f"(a stand-in for a trained model until training lands). {n_query} queries against "
        f"{args.items - n_query} database items.\n"
    )
    print(f"  I->T mAP@all   {result['i2t']:.4f}")
    print(f"  T->I mAP@all   {result['t2i']:.4f}")
    print(f"  random codes   {result['random']:.4f}")
    print(f"  top-1 I->T hit shares a label with its query: {first_hit_shares_label:.1%}")
    print(f"\nfirst query's 10 nearest texts (id: Hamming distance): "
          + ", ".join(f"{i}: {d}" for i, d in zip(ids[0], dist[0])))
    print(f"done in {seconds:.2f} s")
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

    demo = sub.add_parser("demo", help="the main job end to end on an embedded dataset")
    demo.add_argument("--items", type=int, default=20000, help="generated items (default 20000)")
    demo.add_argument("--bits", type=int, default=64, help="code length (default 64)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(func=cmd_demo)

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
