"""A user's mistake on the command line ends in one line on stderr naming the problem and
exit status 2; a bug (any other exception) keeps its traceback."""

import io
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cmhash import limits
from cmhash.cli import main

ROOT = Path(__file__).resolve().parents[2]
CODES = np.random.default_rng(0).integers(0, 256, (20, 4), dtype=np.uint8)


def fails(capsys, argv, *words):
    """Run the CLI; assert status 2 and one stderr line holding each of ``words``."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def codes_npy(tmp_path):
    np.save(tmp_path / "codes.npy", CODES)
    return tmp_path / "codes.npy"


@pytest.fixture
def index_file(tmp_path, codes_npy):
    assert main(["index", "build", str(codes_npy), "--out", str(tmp_path / "i.cmhidx")]) == 0
    return tmp_path / "i.cmhidx"


def test_good_inputs_still_work(tmp_path, codes_npy, capsys):
    assert main(["index", "build", str(npz(tmp_path / "c.npz", codes=CODES, ids=np.arange(20) * 3)),
                 "--out", str(tmp_path / "j.cmhidx")]) == 0
    assert main(["search", str(tmp_path / "j.cmhidx"), str(codes_npy), "-k", "1", "--json"]) == 0
    assert '"ids": [\n    [\n      0\n    ],\n    [\n      3\n' in capsys.readouterr().out


def test_bad_code_files(tmp_path, codes_npy, capsys):
    out = tmp_path / "x.cmhidx"
    data = codes_npy.read_bytes()
    (tmp_path / "short.npy").write_bytes(data[:-5])
    fails(capsys, ["index", "build", tmp_path / "short.npy", "--out", out], "truncated")
    (tmp_path / "header.npy").write_bytes(data[:20])
    fails(capsys, ["index", "build", tmp_path / "header.npy", "--out", out], "not a readable .npy")
    good = npz(tmp_path / "c.npz", codes=CODES).read_bytes()
    (tmp_path / "short.npz").write_bytes(good[: len(good) // 2])
    fails(capsys, ["index", "build", tmp_path / "short.npz", "--out", out], "short.npz")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    fails(capsys, ["index", "build", tmp_path / "obj.npy", "--out", out], "Python objects")
    npz(tmp_path / "obj.npz", codes=np.array([b"x", 3], dtype=object))
    fails(capsys, ["index", "build", tmp_path / "obj.npz", "--out", out], "Python objects")
    np.save(tmp_path / "scalar.npy", np.array(7, np.uint8))
    fails(capsys, ["index", "build", tmp_path / "scalar.npy", "--out", out], "shape ()")
    np.save(tmp_path / "float.npy", CODES.astype(np.float32))
    fails(capsys, ["index", "build", tmp_path / "float.npy", "--out", out], "uint8")
    fails(capsys, ["index", "build", npz(tmp_path / "none.npz", other=CODES), "--out", out], "no 'codes'")
    assert not out.exists()


@pytest.mark.parametrize("ids, word", [
    (np.r_[np.arange(19), 3], "duplicate"),
    (np.r_[-1, np.arange(19)], "ids must be >= 0"),
    (np.arange(20, dtype=np.float64), "int"),
    (np.arange(19), "19"),
    (np.arange(20).reshape(4, 5), "shape"),
])
def test_bad_ids_in_index_build(tmp_path, capsys, ids, word):
    fails(capsys, ["index", "build", npz(tmp_path / "c.npz", codes=CODES, ids=ids), "--out", tmp_path / "x"], word)
    assert not (tmp_path / "x").exists()


def test_inflating_npz_is_refused_before_allocation(tmp_path, capsys, monkeypatch):
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        buf = io.BytesIO()
        np.save(buf, np.zeros((1 << 20, 64), np.uint8))  # 64 MiB of zeros, ~64 KiB deflated
        zf.writestr("codes.npy", buf.getvalue())
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setattr(limits, "MAX_INPUT_BYTES", 8 << 20)
    tracemalloc.start()
    try:
        fails(capsys, ["index", "build", bomb, "--out", tmp_path / "x"], "MAX_INPUT_BYTES", "0.1 GiB")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MiB allocated to refuse the input"


def test_unusable_paths(tmp_path, codes_npy, index_file, capsys):
    (tmp_path / "empty").mkdir()  # a folder is a sharded index: one without shards is refused
    fails(capsys, ["index", "info", tmp_path / "empty"], "no .cmhidx or .parquet shards", str(tmp_path / "empty"))
    fails(capsys, ["index", "build", codes_npy, "--out", tmp_path / "no" / "such" / "x"], "No such file")
    (tmp_path / "taken").mkdir()
    fails(capsys, ["index", "build", codes_npy, "--out", tmp_path / "taken"], "taken")
    fails(capsys, ["search", tmp_path / "missing", codes_npy], "missing")


def test_an_unwritable_out_folder(tmp_path, codes_npy):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a process that file modes apply to")
    folder = tmp_path / "theirs"
    folder.mkdir()
    os.chown(folder, 65534, 65534)
    drop = "-dac_override,-dac_read_search"
    result = subprocess.run(["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-c",
                             "import sys, cmhash.cli; sys.exit(cmhash.cli.main(sys.argv[1:]))",
                             "index", "build", str(codes_npy), "--out", str(folder / "x")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "Permission denied" in result.stderr


def test_a_full_disk_or_file_size_limit(tmp_path):
    np.save(tmp_path / "big.npy", np.zeros((4000, 8), np.uint8))
    script = textwrap.dedent("""
        import resource, sys
        import cmhash.cli
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
        sys.exit(cmhash.cli.main(sys.argv[1:]))
    """)
    result = subprocess.run([sys.executable, "-c", script, "index", "build", str(tmp_path / "big.npy"),
                             "--out", str(tmp_path / "x.cmhidx")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "File too large" in result.stderr and "disk full" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npy"]  # no partial or temporary file left


@pytest.mark.parametrize("argv, word", [
    (["search", "{index}", "{codes}", "-k", "0"], "-k: must be at least 1, got 0"),
    (["search", "{index}", "{codes}", "-k", "ten"], "-k: expected a positive integer, got 'ten'"),
    (["encode", "b", "in", "--out", "o", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["encode", "b", "in", "--out", "o", "--chunk-size", "-3"], "--chunk-size: must be at least 1"),
    (["encode", "b", "in", "--out", "o", "--workers", "0"], "--workers"),
    (["bench", "b", "--cold-runs", "abc"], "--cold-runs: expected a positive integer, got 'abc'"),
    (["bench", "b", "--cold-runs", "0"], "--cold-runs: must be at least 1, got 0"),
    (["bench", "b", "--providers", ","], "--providers: expected comma-separated names"),
    (["bench", "b", "--repeats", "0"], "--repeats"),
])
def test_bad_numbers_are_usage_errors(capsys, index_file, codes_npy, argv, word):
    argv = [a.format(index=index_file, codes=codes_npy) for a in argv]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and word in err, err


@pytest.mark.parametrize("override, word", [
    ("train.device=cudaX", "train.device"),
    ("train.device=cuda:", "train.device"),
    ("train.seed=99999999999999999999", "train.seed must be below 2**63"),
])
def test_bad_training_options_fail_at_validation(tmp_path, capsys, override, word):
    pytest.importorskip("torch")
    fails(capsys, ["train", "egath/demo", override, f"train.out_dir={tmp_path / 'run'}"], word)
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_a_bug_keeps_its_traceback(index_file, codes_npy, monkeypatch):
    from cmhash.index import HashIndex

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(HashIndex, "search", broken)
    with pytest.raises(ZeroDivisionError):
        main(["search", str(index_file), str(codes_npy)])


def test_a_huge_k_is_a_limit_not_a_memory_error(index_file, codes_npy, capsys):
    fails(capsys, ["search", index_file, codes_npy, "-k", str(10**12)], "MAX_RESULT_BYTES")


def test_encode_into_an_unusable_out(tmp_path, capsys):
    pytest.importorskip("onnx")
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.towers import make_bundle

    bundle, _ = make_bundle(tmp_path / "b", modalities=("text",))
    (tmp_path / "texts.txt").write_text("cat\n")
    (tmp_path / "file").write_text("in the way")
    fails(capsys, ["encode", bundle, tmp_path / "texts.txt", "--out", tmp_path / "file" / "out", "--modality", "text"],
          "Not a directory")
