"""Tests of cmhash.training. They need the ``train`` extra; without it the whole folder
is reported as skipped instead of failing at import."""

from pathlib import Path

import pytest

for _module in ("torch", "torchvision", "open_clip", "torch_geometric", "ot", "scipy", "PIL", "safetensors"):
    pytest.importorskip(_module)

# shared/ sits beside the repository checkout (../shared/data from the repository root)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not present: {path}")
    return path


# A small generated-shapes data section for the methods' tiny configs, preprocessed once in memory.
SHAPES = ["data.source=shapes", "data.n=160", "data.seed=0", "data.split={query: 32, train: 96, seed: 0}", "data.cache=true"]


def first_batch(prepared, n: int = 24):
    """The first ``n`` training items of a ``run.Prepared`` as a method's Batch."""
    import torch

    from cmhash.training.method import Batch

    items = [prepared.train[k] for k in range(n)]
    return Batch(torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]).float(),
                 torch.stack([i[2] for i in items]).float(), torch.arange(n))
