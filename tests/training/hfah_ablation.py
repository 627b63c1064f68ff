"""HFAH ablation on small data (not a pytest test: it takes minutes): full HFAH against
HFAH-3 (no reconstruction / adversarial part), HFAH-2 (also no hybrid attention) and HFAH-1
(also no multi-scale text fusion), each over a few seeds, with a shipped config; prints a
Markdown table. Run from the repository root, beside ../shared:

    python tests/training/hfah_ablation.py hfah/mirflickr-mini [--seeds 3] [key=value ...]
    python tests/training/hfah_ablation.py hfah/demo --seeds 2 train.epochs=12
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
from test_hfah import run_shipped  # noqa: E402

from cmhash.training.methods.hfah import ABLATIONS  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", help="a shipped config, e.g. hfah/mirflickr-mini")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows, chance = [], None
    for variant, switches in ABLATIONS.items():
        switch_overrides = [f"model.{k}={str(v).lower()}" for k, v in switches.items()]
        scores, started = [], time.perf_counter()
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            with tempfile.TemporaryDirectory() as out:
                i2t, t2i, chance, _ = run_shipped(args.config, Path(out), *args.overrides, *switch_overrides,
                                                  f"train.seed={seed}")
            scores.append((i2t, t2i))
        s = np.array(scores)
        rows.append((variant.upper(), s[:, 0].mean(), s[:, 0].std(), s[:, 1].mean(), s[:, 1].std(),
                     (time.perf_counter() - started) / args.seeds))
        print(f"{variant}: {scores}", flush=True)

    print(f"\n{args.config} {' '.join(args.overrides)}: mean (std) over {args.seeds} seeds; random codes {chance:.3f}\n")
    print("| variant | I->T | T->I | s / run |\n|---|---|---|---|")
    for name, i2t, i2t_sd, t2i, t2i_sd, seconds in rows:
        print(f"| {name} | {i2t:.3f} ({i2t_sd:.3f}) | {t2i:.3f} ({t2i_sd:.3f}) | {seconds:.0f} |")


if __name__ == "__main__":
    main()
