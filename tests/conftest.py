"""Fixtures shared by the whole suite, and the registry of CPU-sensitive tests."""

import random
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from cmhash.cpus import quiet_openmp_waits

quiet_openmp_waits()  # before any test module imports torch

ROOT = Path(__file__).resolve().parents[1]

# Tests whose outcome depends on the CPU's instruction set, marked ``cpu_sensitive`` here in
# one place. CI runs them a second time under an emulated AVX2-only CPU (docs/testing.md).
# Tests of the native kernels at each SIMD level are found by the fixture that sets the level.
SIMD_LEVEL_FIXTURES = {"level", "each_simd_level"}
CPU_SENSITIVE = {
    # int8 variants verified against the bit-agreement floor: onnxruntime's int8 kernels
    # differ with and without VNNI
    "tests/test_export.py": "int8",
    "tests/test_export_egath.py": "int8",
    "tests/test_export_attention.py::test_int8_dynamic_quantises_all_but_the_hash_head": "int8",
    # the kernel level is drawn by hypothesis, not set by a fixture
    "tests/test_search.py::test_knn_property": "simd",
    # the C library loaded into this process (ctypes) chooses its kernels from this CPU
    "tests/test_clib.py::test_shared_library": "simd",
    # learning: a trained model must beat a margin; float kernels (AVX-512 or AVX2 GEMMs)
    # round differently, so the margin is set from a spread over seeds. Marked ``learning``
    # too: minutes each, too slow to emulate.
    "tests/training/test_trainer.py::test_learning_improves_retrieval_over_chance": "learning",
    "tests/training/test_egath.py::test_learns_real_mirflickr_photos_better_than_random": "learning",
    "tests/training/test_egath.py::test_demo_learns_the_generated_dataset": "learning",
    "tests/training/test_tegah.py::test_learns_real_mirflickr_photos_better_than_random": "learning",
    "tests/training/test_tegah.py::test_learns_the_generated_dataset": "learning",
    "tests/training/test_hfah.py::test_demo_learns_the_generated_shapes": "learning",
    "tests/training/test_hfah.py::test_beats_random_codes_on_mirflickr_mini": "learning",
}


def _entry(nodeid: str) -> str | None:
    """The CPU_SENSITIVE key naming this test, if any."""
    for key in CPU_SENSITIVE:
        if nodeid == key or nodeid.startswith((key + "::", key + "[")):
            return key
    return None


@pytest.hookimpl(tryfirst=True)  # before -m and -k select
def pytest_collection_modifyitems(config, items):
    matched = set()
    for item in items:
        key = _entry(item.nodeid)
        matched.add(key)
        if key or SIMD_LEVEL_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.cpu_sensitive)
        if key and CPU_SENSITIVE[key] == "learning":
            item.add_marker(pytest.mark.learning)
    # an entry that names no test any more (renamed, moved) must not drop out silently;
    # checkable when whole files were collected
    if not any("::" in arg for arg in config.args):
        files = {item.nodeid.split("::")[0] for item in items}
        stale = [key for key in CPU_SENSITIVE if key.split("::")[0] in files and key not in matched]
        if stale:
            raise pytest.UsageError(f"CPU_SENSITIVE in tests/conftest.py names tests that do not exist: {stale}")


@pytest.fixture(autouse=True)
def _learning_tests_are_deterministic(request):
    """A learning test trains with one torch thread from fixed seeds, so its verdict does not
    depend on how many cores the machine has (reductions split over threads add in another
    order); its margin covers the spread over seeds, hence over CPUs' float rounding."""
    if request.node.get_closest_marker("learning") is None:
        yield
        return
    request.getfixturevalue("one_torch_thread")
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def plain_wheel_python(tmp_path_factory) -> Path:
    """The python of a fresh virtual environment holding only ``pip install <our wheel>``
    (no extras, no source tree): what an SDK user gets. Built once per session."""
    tmp = tmp_path_factory.mktemp("plain_wheel")
    # Built from a copy of the tracked files: building in place would leave a cmhash_sdk.egg-info
    # in the checkout, whose entry points then shadow the installed ones for anything run there.
    source = tmp / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # Build isolation: pip fetches setuptools and wheel from the index itself, as a user's pip does.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "wheels", source], check=True, cwd=tmp)
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
