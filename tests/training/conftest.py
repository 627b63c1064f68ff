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
