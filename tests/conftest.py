"""Fixtures shared by the whole suite."""

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def plain_wheel_python(tmp_path_factory) -> Path:
    """The python of a fresh virtual environment holding only ``pip install <our wheel>``
    (no extras, no source tree): what an SDK user gets. Built once per session."""
    tmp = tmp_path_factory.mktemp("plain_wheel")
    # Build isolation: pip fetches setuptools and wheel from the index itself, as a user's pip does.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "wheels", ROOT], check=True, cwd=tmp)
    (wheel,) = (tmp / "wheels").glob("cmhash_sdk-*.whl")
    venv.create(tmp / "env", with_pip=True)
    python = tmp / "env" / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", str(wheel)], check=True, cwd=tmp)
    return python


def pytest_configure(config):
    try:
        import torch
    except ImportError:
        return
    config.cmhash_torch_threads = torch.get_num_threads()  # torch's default for this machine


@pytest.fixture(autouse=True)
def _torch_threads_restored(request):
    """Tests and fixtures may run torch on one thread; later tests get the default back
    (CPU results are bitwise reproducible only at a fixed thread count)."""
    yield
    threads = getattr(request.config, "cmhash_torch_threads", None)
    torch = sys.modules.get("torch")
    if threads is not None and torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
