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



@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on this 2-core CPU: one intra-op thread is faster (a second only adds
    contention) and keeps CPU results bitwise reproducible. Restored after the module."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter):
    """Say at the end of the run how much skipped for missing test data (fixtures/data.py),
    so that a green run cannot hide a module that never ran."""
    from fixtures.data import DATA_ENV, MISSING_DATA, data_dir

    tests = modules = 0
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple) and MISSING_DATA in str(report.longrepr[2]):
            if report.when == "collect":  # a module-level skip
                modules += 1
            else:
                tests += 1
    if tests or modules:
        terminalreporter.write_line(
            f"{MISSING_DATA} in {data_dir()}: {tests} test(s) and {modules} module(s) skipped "
            f"(set {DATA_ENV} to the data folder)", yellow=True, bold=True)
