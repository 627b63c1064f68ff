"""The project's own promises: README and CI agree, docs/cli.md documents every command,
commands register from their own layer, a plain wheel works without the source tree and
without torch."""

import argparse
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cmhash.cli import build_parser, registered_commands

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"demo", "train", "eval", "export", "encode", "index", "search", "query", "serve", "bench", "verify",
            "providers"}


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


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_commands_of_training_and_export_register_from_their_own_packages():
    commands = registered_commands()
    assert {"demo", "train", "eval", "export"} <= set(commands)
    for name in ("train", "eval"):
        assert commands[name].__module__ == "cmhash.training.cli"
    for name in ("demo", "export"):
        assert commands[name].__module__ == "cmhash.export.cli"
    assert COMMANDS <= set(_subcommands(build_parser()))


def test_docs_cli_documents_every_command_and_option():
    text = (ROOT / "docs" / "cli.md").read_text()
    sections = dict(re.findall(r"^## `cmhash (\S+)`\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    for name, parser in _subcommands(build_parser()).items():
        assert name in sections, f"docs/cli.md has no section '## `cmhash {name}`'"
        nested = [parser, *(_subcommands(parser).values() if any(isinstance(a, argparse._SubParsersAction)
                                                                 for a in parser._actions) else [])]
        for sub in nested:
            for action in sub._actions:
                for option in action.option_strings:
                    if option not in ("-h", "--help"):  # described, not only in the usage line
                        assert f"`{option}" in sections[name], f"docs/cli.md: `cmhash {name}` does not describe {option}"


def test_help_lists_every_command_without_importing_torch():
    script = ("import sys\nfrom cmhash.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
              "heavy = sorted(m for m in ('torch', 'onnx', 'open_clip', 'ray', 'pyspark', 'pyarrow', 'fsspec', 'pandas') "
              "if m in sys.modules)\nprint('heavy', heavy)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "heavy []" in out.stdout
    listed = set(re.findall(r"^    (\w+)(?: |$)", out.stdout, re.M))  # a long name has its help on the next line
    assert COMMANDS <= listed, out.stdout


def test_training_commands_print_no_dependency_deprecation_warning(tmp_path):
    """torch warns that torch.jit.script is deprecated whenever torch_geometric scripts its
    helpers at import: that is hidden (exactly that warning) where cmhash imports it."""
    pytest.importorskip("torch_geometric")
    out = subprocess.run([sys.executable, "-m", "cmhash.cli", "train", "egath/demo", "train.epochs=0"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "train.epochs must be positive" in out.stderr, out.stderr  # the method was built
    assert "Warning" not in out.stderr, out.stderr


def test_skips_for_missing_data_are_counted_at_the_end_of_the_run(tmp_path):
    """CMHASH_TEST_DATA names the data folder; a run without the data says how many tests
    and whole modules skipped for it (here: a test of test_metrics.py, and the test_export.py
    module), so a green run cannot hide them."""
    pytest.importorskip("onnx")
    env = {**os.environ, "CMHASH_TEST_DATA": str(tmp_path / "no-data")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_metrics.py::test_matches_literature_calc_map_k_on_mirflickr_labels",
                          "tests/test_export.py"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (f"test data not present in {tmp_path / 'no-data'}: 1 test(s) and 1 module(s) skipped "
            "(set CMHASH_TEST_DATA to the data folder)") in out.stdout, out.stdout


@pytest.mark.parametrize("argv, extra", [(["train", "egath/demo"], "train"), (["eval", "runs/x"], "train"),
                                         (["demo"], "train"), (["export", "ckpt", "--out", "b"], "export")])
def test_a_command_without_its_extra_names_the_extra_in_one_line(argv, extra, tmp_path):
    script = f"import sys; sys.modules['torch'] = None; from cmhash.cli import main; sys.exit(main({argv!r}))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and f'pip install "cmhash-sdk[{extra}]"' in out.stderr, out.stderr


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
        heavy = {"torch", "onnxruntime", "matplotlib", "ray", "pyspark", "pyarrow", "fsspec", "pandas"} & set(sys.modules)
        assert not heavy, f"import cmhash loaded {heavy}"
        print("ok", cmhash._hamming.get_simd_level())
        """
    )
    out = subprocess.run([plain_wheel_python, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
    # the wheel's cmhash command lists the commands of every layer, and names the extra they need
    cmhash = Path(plain_wheel_python).parent / "cmhash"
    listed = subprocess.run([cmhash, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert listed.returncode == 0 and COMMANDS <= set(re.findall(r"^    (\w+)(?: |$)", listed.stdout, re.M)), listed.stdout
    train = subprocess.run([cmhash, "train", "egath/demo"], capture_output=True, text=True, cwd=tmp_path)
    assert train.returncode == 2 and 'pip install "cmhash-sdk[train]"' in train.stderr, train.stderr


def test_renamed_public_names_keep_their_old_names_for_one_release():
    import cmhash._files
    import cmhash.files

    assert cmhash._files.atomic_write is cmhash.files.atomic_write
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    import cmhash.training.methods.hfah
    from cmhash.training.methods import tegah

    sys.modules.pop("cmhash.training.models", None)  # its warning fires on import
    with pytest.warns(DeprecationWarning, match="cmhash.training.methods"):
        import cmhash.training.models.hfah
    assert cmhash.training.models.hfah is cmhash.training.methods.hfah  # the same classes, one registry
    assert tegah.Tegah is tegah.TEGAH and tegah.TegahConfig is tegah.TEGAHConfig
    from cmhash.training import run

    with pytest.warns(DeprecationWarning, match="load_config"):
        assert run.load_config(run.resolve_config("egath/nuswide10-16")).model.bits == 16
