"""Tests of cmhash.training. They need the ``train`` extra; without it the whole folder
is reported as skipped instead of failing at import."""

from pathlib import Path

import pytest

for _module in ("torch", "torchvision", "open_clip", "torch_geometric", "ot", "scipy", "PIL", "safetensors"):
    pytest.importorskip(_module)

from fixtures.data import DATA as SHARED_DATA  # noqa: E402
from fixtures.data import require  # noqa: E402,F401  (the tests import it from here)


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


# A small generated-shapes data section for the methods' tiny configs, preprocessed once in memory.
SHAPES = ["data.source=shapes", "data.n=160", "data.seed=0", "data.split={query: 32, train: 96, seed: 0}", "data.cache=true"]


def first_batch(prepared, n: int = 24):
    """The first ``n`` training items of a ``run.Prepared`` as a method's Batch."""
    import torch

    from cmhash.training.method import Batch

    items = [prepared.train[k] for k in range(n)]
    return Batch(torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]).float(),
                 torch.stack([i[2] for i in items]).float(), torch.arange(n))


def triplet_reference(a, t, labels, margin: float) -> float:
    """The DCG-weighted cosine triplet loss by loops over (i, j, m), straight from the specs'
    definition (EGATH §6.1, TEGAH §3.1): raw shared-label counts, ideal-DCG gains."""
    import math

    import torch

    s = labels @ labels.T
    total = 0.0
    for i in range(len(a)):
        ideal = sorted(s[i].tolist(), reverse=True)
        z = sum((2 ** v - 1) / math.log2(r + 2) for r, v in enumerate(ideal))
        d = [max(0.0, 1 - torch.nn.functional.cosine_similarity(a[i], t[j], dim=0).item()) for j in range(len(t))]
        for j in range(len(t)):
            for m in range(len(t)):
                if s[i, j] > 0 and s[i, m] == 0:
                    total += (2 ** s[i, j].item() - 1) / z * max(d[j] - d[m] + margin, 0.0)
    return total
