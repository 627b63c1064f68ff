"""The project's own promises: README and CI agree, a plain wheel works without the
source tree and without torch."""

import re
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The first two shell commands of README.md (the set-up block)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_demo_and_test_commands():
    demo, tests = readme_commands()[:2]
    assert demo.endswith("cmhash demo")
    assert tests.endswith("pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


@pytest.mark.slow
def test_plain_wheel_works_without_source_tree_or_torch(plain_wheel_python, tmp_path):
    script = textwrap.dedent(
        """
        import sys, numpy as np, cmhash
        assert cmhash.__file__.startswith(sys.prefix), cmhash.__file__
        from cmhash import HashIndex, pack_codes
        from cmhash.metrics import mean_average_precision
        rng = np.random.default_rng(0)
        db = pack_codes(rng.standard_normal((100, 64)))
        index = HashIndex(64)
        index.add(db)
        dist, ids = index.search(db[:3], 5)
        assert ids[:, 0].tolist() == [0, 1, 2] and (dist[:, 0] == 0).all()
        labels = rng.integers(0, 2, (100, 5))
        assert mean_average_precision(db, db, labels, labels) > 0
        heavy = {"torch", "onnxruntime", "matplotlib"} & set(sys.modules)
        assert not heavy, f"import cmhash loaded {heavy}"
        print("ok", cmhash._hamming.get_simd_level())
        """
    )
    out = subprocess.run([plain_wheel_python, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
