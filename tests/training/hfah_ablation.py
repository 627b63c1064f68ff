"""HFAH ablation on small data (not a pytest test: it takes minutes): full HFAH against
HFAH-3 (no reconstruction / adversarial part), HFAH-2 (also no hybrid attention) and HFAH-1
(also no multi-scale text fusion), each over a few seeds; prints a Markdown table.

    python tests/training/hfah_ablation.py mirflickr-mini [--seeds 3] [--epochs 6]
    python tests/training/hfah_ablation.py shapes [--seeds 2] [--epochs 12]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_hfah import SHAPES_RUN, cached_splits, fit_and_score, random_codes_map  # noqa: E402

from cmhash.training.models.hfah import ABLATIONS, HFAHConfig, backbone_preprocessing  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", choices=["mirflickr-mini", "shapes"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from cmhash.training.data import load_mirflickr_mini, make_shapes, make_split

    preprocess = backbone_preprocessing(HFAHConfig(backbone="tiny-cnn", image_size=32))
    if args.dataset == "mirflickr-mini":
        data = load_mirflickr_mini(Path(__file__).resolve().parents[3] / "shared" / "data" / "mirflickr-mini")
        split = make_split(len(data), {"query": 80, "train": 300, "seed": 0})
        extra = ["model.text_windows=[5,10,15]", "model.label_pretrain_epochs=20"]
    else:
        data = make_shapes(2600, seed=0, image_size=32)
        split = make_split(len(data), {"query": 200, "train": 2000, "seed": 0})
        data = data.with_vocabulary(data.build_vocabulary(split.train))
        extra = ["train.batch_size=32"]
    train, query, database = cached_splits(data, split, preprocess)
    chance = random_codes_map(query, database, 32)

    rows = []
    for variant, switches in ABLATIONS.items():
        overrides = [f"model.{k}={str(v).lower()}" for k, v in switches.items()]
        scores, started = [], time.perf_counter()
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as out:
                scores.append(fit_and_score(Path(out), train, query, database, preprocess, *SHAPES_RUN, *extra,
                                            *overrides, f"train.epochs={args.epochs}", f"train.seed={seed}"))
        s = np.array(scores)
        rows.append((variant.upper(), s[:, 0].mean(), s[:, 0].std(), s[:, 1].mean(), s[:, 1].std(),
                     (time.perf_counter() - started) / args.seeds))
        print(f"{variant}: {scores}", flush=True)

    print(f"\n{args.dataset}, 32 bits, tiny CNN at 32 px, {args.epochs} epochs, mean (std) over {args.seeds} seeds; "
          f"random codes: {chance:.3f}\n")
    print("| variant | I->T | T->I | s / run |\n|---|---|---|---|")
    for name, i2t, i2t_sd, t2i, t2i_sd, seconds in rows:
        print(f"| {name} | {i2t:.3f} ({i2t_sd:.3f}) | {t2i:.3f} ({t2i_sd:.3f}) | {seconds:.0f} |")


if __name__ == "__main__":
    main()
