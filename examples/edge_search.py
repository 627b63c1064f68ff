"""Edge-style search with the SDK only (numpy, Pillow, onnxruntime; no torch): load a bundle
and an index made by ``cmhash encode`` + ``cmhash index build``, then answer text and image
queries from the command line.

    python examples/edge_search.py BUNDLE INDEX NAMES.npz "a red circle" [photo.jpg ...] [-k 5]

NAMES.npz is the ``codes.npz`` that ``cmhash encode`` wrote (its ``ids`` and ``names`` say
which item each id is). Loading verifies the bundle's checksums; nothing is unpickled. A
query that looks like a path (an image suffix, or a path separator) must name a file.
Needs only the SDK (``pip install cmhash-sdk``).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from cmhash import Encoder, HashIndex
from cmhash.inputs import IMAGE_SUFFIXES


def looks_like_a_path(query: str) -> bool:
    """A mistyped image path must not be searched as a text."""
    return Path(query).suffix.lower() in IMAGE_SUFFIXES or "/" in query or os.sep in query


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("index")
    parser.add_argument("names", help="the codes.npz of cmhash encode (ids and names)")
    parser.add_argument("queries", nargs="+", help="texts, or paths of images")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="an edge box has few cores")
    args = parser.parse_args()
    missing = [q for q in args.queries if looks_like_a_path(q) and not Path(q).is_file()]
    if missing:
        parser.error(f"no such image: {missing[0]} (a query with an image suffix or a path separator is a path)")

    started = time.perf_counter()
    encoder = Encoder.load(args.bundle, backend="onnxruntime", threads=args.threads)
    index = HashIndex.load(args.index, mmap=True)
    with np.load(args.names, allow_pickle=False) as z:
        names = dict(zip(z["ids"].tolist(), z["names"].tolist()))
    print(f"{encoder} and {len(index)} codes loaded in {time.perf_counter() - started:.2f} s")

    for query in args.queries:
        t0 = time.perf_counter()
        is_image = Path(query).is_file()
        code = encoder.hash(query) if is_image else encoder.hash_text(query)
        distances, ids = index.search(code[None, :], args.k)
        ms = (time.perf_counter() - t0) * 1e3
        kind = "image" if is_image else "text"
        hits = ", ".join(f"{names.get(int(i), i)} ({d})" for i, d in zip(ids[0], distances[0]) if i >= 0)
        print(f"[{kind}] {query!r} -> {hits}  [{ms:.1f} ms]")
    assert "torch" not in sys.modules  # the edge install has no torch


if __name__ == "__main__":
    main()
