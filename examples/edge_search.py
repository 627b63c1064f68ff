"""Edge-style search with the SDK only (numpy, Pillow, onnxruntime; no torch): load a bundle
and an index made by ``cmhash encode`` + ``cmhash index build`` once, then answer several
text and image queries, one onnxruntime thread, as a small device would.

    python examples/edge_search.py BUNDLE INDEX --text "a red circle" --image photo.jpg [-k 5]

Each query goes through :class:`cmhash.query.Searcher`, the code path of ``cmhash query``
(one query per process) and ``cmhash serve``: names come from the index, a bundle that did
not make the index is refused, a text with no word of the vocabulary is an error, and an
``--image`` path that does not exist is an error, never a text.
Needs only the SDK (``pip install cmhash-sdk``).
"""

import argparse
import sys
import time
from pathlib import Path

from cmhash import CmhashError, Encoder
from cmhash.query import Searcher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("index", help="built by cmhash index build from the codes.npz of cmhash encode")
    parser.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    parser.add_argument("--image", action="append", default=[], help="the path of a query image (repeatable)")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="an edge box has few cores")
    args = parser.parse_args()
    if not args.text and not args.image:
        parser.error("give at least one --text or --image")
    missing = [p for p in args.image if not Path(p).is_file()]
    if missing:
        parser.error(f"no such image: {missing[0]}")

    started = time.perf_counter()
    try:
        searcher = Searcher.open(Encoder.load(args.bundle, backend="onnxruntime", threads=args.threads), args.index)
    except CmhashError as exc:
        parser.error(str(exc))
    print(f"{searcher.encoder} and {len(searcher)} codes loaded in {time.perf_counter() - started:.2f} s")

    queries = [("text", t) for t in args.text] + [("image", Path(p)) for p in args.image]
    for kind, query in queries:
        t0 = time.perf_counter()
        try:
            hits = searcher.search_text(query, args.k) if kind == "text" else searcher.search_image(query, args.k)
        except CmhashError as exc:
            print(f"[{kind}] {str(query)!r}: {exc}")
            continue
        ms = (time.perf_counter() - t0) * 1e3
        shown = ", ".join(f"{hit.name if hit.name is not None else hit.id} ({hit.distance})" for hit in hits)
        print(f"[{kind}] {str(query)!r} -> {shown}  [{ms:.1f} ms]")
    assert "torch" not in sys.modules  # the edge install has no torch


if __name__ == "__main__":
    main()
