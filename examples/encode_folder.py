"""Offline encoding of a folder of images with a bundle, then one index file to search.

    python examples/encode_folder.py BUNDLE PHOTOS_DIR OUT_DIR [--workers 4]

Re-running after a kill continues where it stopped (``resume=True``); unreadable images
are listed in OUT_DIR/errors.jsonl. The same as ``cmhash encode BUNDLE PHOTOS_DIR --out
OUT_DIR --resume`` followed by ``cmhash index build OUT_DIR/codes.npz --out OUT_DIR/index.chi``.
Needs only the SDK (``pip install cmhash-sdk``).
"""

import argparse
import json
from pathlib import Path

import numpy as np

from cmhash import HashIndex
from cmhash.offline import Progress, encode_collection


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("photos")
    parser.add_argument("out")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    summary = encode_collection(args.bundle, args.photos, args.out, workers=args.workers, batch_size=args.batch_size,
                                resume=True, progress=Progress())
    print(json.dumps(summary, indent=2))

    with np.load(Path(args.out) / "codes.npz", allow_pickle=False) as z:
        codes, ids, names = z["codes"], z["ids"], z["names"].tolist()
        fingerprint = str(z["bundle_fingerprint"])
    # the index remembers the items' names and the bundle whose codes it holds, as
    # `cmhash index build` makes it, so that `cmhash query` and `cmhash serve` can use it
    index = HashIndex(codes.shape[1] * 8, metadata={"bundle_fingerprint": fingerprint, "modality": "image"})
    index.add(codes, ids, names=names)
    index.save(Path(args.out) / "index.chi")
    # near-duplicates: the first image's nearest neighbours in Hamming distance
    distances, hits = index.search(codes[:1], 5)
    print(f"nearest to {names[0]}:", ", ".join(f"{name} ({d})" for name, d in zip(index.names(hits[0]), distances[0])))


if __name__ == "__main__":
    main()
