"""Quickstart: demo data -> train a tiny EGATH -> export -> hash -> index -> search -> top hits.

    python examples/quickstart.py [--epochs 4] [--out runs/quickstart]

Needs the export extra (``pip install "cmhash-sdk[export]"``) for training and export; the
part after the export uses the SDK only. A few minutes on a laptop CPU.
"""

import argparse
from pathlib import Path

import numpy as np

from cmhash import Encoder, HashIndex
from cmhash.cli import exit_without_extra

exit_without_extra("export", "torch", "open_clip", "torch_geometric", "onnx", "onnxscript")

from cmhash.export import export_checkpoint  # noqa: E402
from cmhash.training.data import captions  # noqa: E402
from cmhash.training.run import load_config, prepare_data, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default="runs/quickstart")
    args = parser.parse_args()
    out = Path(args.out)

    # 1. train the shipped demo config (generated coloured shapes with captions), briefly
    config = load_config("egath/demo",
                         [f"train.out_dir={out / 'run'}", f"train.epochs={args.epochs}", "train.eval_every=0"])
    result = train(config)
    print(f"trained: mAP I->T {result.best['map_i2t']:.3f}, T->I {result.best['map_t2i']:.3f}")

    # 2. export the towers, verified against PyTorch on the run's own data
    report = export_checkpoint(out / "run", out / "bundle", int8=True, overwrite=True)
    for r in report["results"]:
        print(f"  {r['modality']} {r['variant']}: {r['bit_agreement']:.2%} of bits as in PyTorch")

    # 3. hash the database images with the SDK and index them
    prepared = prepare_data(config)
    data, split = prepared.data, prepared.split
    encoder = Encoder.load(out / "bundle")
    database = [data.images.load(int(i)) for i in split.database]
    index = HashIndex(encoder.bits)
    index.add(encoder.hash_images(database, batch_size=64), np.asarray(split.database, dtype=np.int64))

    # 4. search the images with a caption, and show the captions of the top hits
    texts = captions(data)
    query = texts[int(split.query[0])]
    distances, ids = index.search(encoder.hash_text(query)[None, :], 5)
    print(f"\nquery: {query!r}")
    for d, i in zip(distances[0], ids[0]):
        print(f"  {d:2d} bits  image {i}: {texts[int(i)]!r}")


if __name__ == "__main__":
    main()
