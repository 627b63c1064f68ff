"""Every script of examples/ runs here in its smallest setting, so none can rot: each says
at the top what it needs, a missing extra or a bad argument is one line and exit status 2
(never a traceback), and the SDK-only ones run on a bundle of tiny towers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(script: str, *args, missing: tuple[str, ...] = (), cwd=None) -> subprocess.CompletedProcess:
    """Run ``examples/<script>`` as a user would; ``missing`` modules behave as not installed."""
    if missing:
        hide = "".join(f"sys.modules[{m!r}] = None; " for m in missing)
        argv = [sys.executable, "-c", f"import runpy, sys; {hide}sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')", str(EXAMPLES / script), *map(str, args)]
    else:
        argv = [sys.executable, str(EXAMPLES / script), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd or ROOT)


def one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]  # argparse's errors come after its usage lines
    assert "Traceback" not in out.stderr and all(w in last for w in words), out.stderr


def test_every_example_says_what_it_needs_at_the_top():
    for script in sorted(EXAMPLES.glob("*.py")):
        docstring = re.match(r'"""(.*?)"""', script.read_text(), re.S)
        assert docstring and "Needs" in docstring.group(1), f"{script.name}: say which extra it needs"


def test_bench_search_smallest_setting_and_without_faiss():
    pytest.importorskip("faiss")
    out = run("bench_search.py", "--quick", "--n", 2000, "--nq", 5, "--nq256", 5, "--single", 2, "--numpy-nq", 2,
              "--k", 5)
    assert out.returncode == 0, out.stderr
    assert "n=2,000 random codes" in out.stdout and "results equal FAISS's distances" in out.stdout
    one_line_error(run("bench_search.py", "--quick", missing=("faiss",)), "faiss not installed", "cmhash-sdk[dev]")


def test_bench_mih_smallest_setting_and_without_faiss():
    pytest.importorskip("faiss")
    out = run("bench_mih.py", "--quick", "--data", "clustered", "--hnsw-max", 0)
    assert out.returncode == 0, out.stderr
    assert "cmhash-mih" in out.stdout and "faiss-multihash" in out.stdout and "Targets (" in out.stdout
    assert "ERROR" not in out.stderr  # MultiIndex equals the flat scan
    one_line_error(run("bench_mih.py", "--quick", missing=("faiss",)), "faiss not installed", "cmhash-sdk[dev]")


def test_bench_eval_smallest_setting():
    out = run("bench_eval.py", "--queries", 5, "--database", 2000, "--repeat", 1)
    assert out.returncode == 0, out.stderr
    assert "2100 queries x 2000 database items" in out.stdout and "-> OK" in out.stdout


def test_bench_export_names_its_extra_and_its_photos(tmp_path):
    one_line_error(run("bench_export.py", missing=("torch",)), "torch not installed", "cmhash-sdk[export]")
    pytest.importorskip("onnx")
    pytest.importorskip("open_clip")
    one_line_error(run("bench_export.py", "--photos", tmp_path, "--calibration", 4), "0 .jpg photos", "at least 6")


def test_bench_export_smallest_setting(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("open_clip")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.jpg")
    out = run("bench_export.py", "--backbone", "clip:tiny-resnet", "--photos", tmp_path, "--calibration", 4,
              "--threads", 1, "--rounds", 2, "--batches", 1)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout)
    assert {r["runner"] for r in record["rows"]} == {"pytorch-eager", "fp32", "int8", "int8-dynamic"}
    assert record["agreement_untrained"]["fp32"]["bit_agreement_vs_pytorch"] == 1.0


def test_bench_edge_names_its_extra_and_its_data(tmp_path):
    one_line_error(run("bench_edge.py", "--out", tmp_path / "b", missing=("torch",)), "torch not installed",
                   "cmhash-sdk[export]")
    pytest.importorskip("onnx")
    pytest.importorskip("open_clip")
    one_line_error(run("bench_edge.py", "--out", tmp_path / "b", "--data", tmp_path), "no manifest.jsonl")


@pytest.mark.slow
def test_bench_edge_smallest_setting(tmp_path):
    """The real export path with every variant and --ort, then the bench table (Markdown)."""
    pytest.importorskip("onnx")
    pytest.importorskip("open_clip")
    from fixtures.data import DATA, require

    data = require(DATA / "mirflickr-mini" / "manifest.jsonl").parent
    out = run("bench_edge.py", "--out", tmp_path / "b", "--backbone", "clip:tiny-resnet", "--data", data, "--items", 16,
              "--bench", "--cold-runs", 1)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [tuple(c.strip() for c in r.strip("|").split("|")[:3]) for r in rows] == [
        (v, f, "CPU") for v in ("fp32", "fp16", "int8", "int8-dynamic") for f in ("onnx", "ort")]
    assert "failed" not in out.stdout and (tmp_path / "b" / "required_operators.config").is_file()


@pytest.mark.slow  # exports a small model
def test_bench_decode_smallest_setting(tmp_path):
    one_line_error(run("bench_decode.py", missing=("torch",)), "torch not installed", "cmhash-sdk[export]")
    pytest.importorskip("onnx")
    pytest.importorskip("open_clip")
    one_line_error(run("bench_decode.py", "--photos", tmp_path), "need at least 2 .jpg photos")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.jpg")
    out = run("bench_decode.py", "--backbone", "clip:tiny-resnet", "--photos", tmp_path, "--images", 3,
              "--size", "640x480", "--batch", 2, "--threads", 1, "--workers", 1)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert record["images"].startswith("3 JPEGs 640x480") and record["encode_images_per_s"] > 0
    assert 0.9 <= record["reduced_vs_full"]["code_bit_agreement"] <= 1.0  # 640x480 to 64 px: 1/4-scale decoding
    assert "ratio" in out.stdout.splitlines()[-1]


def test_bench_encode_memory_smallest_setting():
    pytest.importorskip("onnx")
    out = run("bench_encode_memory.py", "--small", 50, "--large", 100)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert record["small"]["encoded"] == 50 and record["large"]["encoded"] == 100
    assert "bytes per extra item" in out.stdout.splitlines()[-1]


def test_quickstart_names_its_extra():
    one_line_error(run("quickstart.py", missing=("torch",)), "torch not installed", "cmhash-sdk[export]")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pytest.importorskip("onnx", reason="the test builds its ONNX towers with the onnx package")
    from fixtures.towers import make_bundle

    return make_bundle(tmp_path_factory.mktemp("b") / "bundle", bits=32, image_size=32)[0]


def test_encode_folder_then_edge_search_on_a_tiny_bundle(bundle, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (24 + i, 40, 3), dtype=np.uint8)).save(photos / f"img{i}.png")
    out = tmp_path / "enc"
    encoded = run("encode_folder.py", bundle, photos, out, "--workers", 2)
    assert encoded.returncode == 0, encoded.stderr
    assert '"encoded": 6' in encoded.stdout and "nearest to" in encoded.stdout
    common = [bundle, out / "index.chi"]
    found = run("edge_search.py", *common, "--text", "a cat on the beach", "--image", photos / "img3.png", "-k", 2)
    assert found.returncode == 0, found.stderr  # the script asserts torch never loaded
    lines = found.stdout.splitlines()
    assert lines[1].startswith("[text] 'a cat on the beach' -> ")
    assert lines[2].startswith(f"[image] {str(photos / 'img3.png')!r} -> img3.png (0)")  # finds itself
    unknown = run("edge_search.py", *common, "--text", "zebra")
    assert unknown.returncode == 0 and "[text] 'zebra': no word of 'zebra'" in unknown.stdout, unknown.stderr
    for typo in ("photos/img3.pgn", "img9.png", str(photos / "nothing"), "a cat"):  # paths, never searched as texts
        one_line_error(run("edge_search.py", *common, "--image", typo), f"no such image: {typo}")


def test_bench_serve_names_its_extras():
    one_line_error(run("bench_serve.py", "bundle", missing=("starlette",)), "starlette not installed",
                   "cmhash-sdk[serve]")


def test_bench_scale_names_its_extra(bundle):
    one_line_error(run("bench_scale.py", bundle, "--engines", "ray", missing=("ray",)), "ray not installed",
                   "cmhash-sdk[ray]")


@pytest.mark.slow
def test_bench_scale_smallest_setting(bundle, tmp_path):
    pytest.importorskip("ray")
    pytest.importorskip("pyarrow")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.jpg")
    out = run("bench_scale.py", bundle, "--photos", tmp_path, "--items", 16, "--chunk-size", 4, "--engines", "ray",
              "--search", "--shards", 2, "--codes", 2000, "--batch-queries", 10)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ray (encode_with_ray)" in out.stdout and "x cmhash encode" not in out.stderr
    assert "results equal" in out.stdout and "overhead" in out.stdout


@pytest.mark.slow
def test_quickstart_runs_end_to_end_without_warnings(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("torch_geometric")
    out = run("quickstart.py", "--epochs", 1, "--out", tmp_path / "qs")
    assert out.returncode == 0, out.stderr
    assert "trained: mAP" in out.stdout and "query:" in out.stdout
    assert "Warning" not in out.stderr, out.stderr


def test_bench_codes_io_smallest_setting_and_without_pyarrow():
    pytest.importorskip("pyarrow")
    out = run("bench_codes_io.py", "--n", 3000, "--shards", 3, "--nq", 4, "--repeat", 1)
    assert out.returncode == 0, out.stderr
    assert "3,000 random 64-bit codes" in out.stdout and "results identical" in out.stdout
    one_line_error(run("bench_codes_io.py", missing=("pyarrow",)), "pyarrow not installed", "cmhash-sdk[parquet]")


def test_bench_serve_smallest_setting(tmp_path):
    """The latency benchmark end to end on a few generated shapes, with a bundle of tiny
    towers whose vocabulary holds the shapes' captions."""
    pytest.importorskip("starlette")
    pytest.importorskip("onnx")
    pytest.importorskip("torch")
    from fixtures.towers import make_bundle

    from cmhash.text import Vocabulary
    from cmhash.training.data.shapes import captions, make_shapes

    vocabulary = Vocabulary.build(captions(make_shapes(200, seed=0)), ngram_max=2)
    bundle = make_bundle(tmp_path / "bundle", bits=32, image_size=32, vocabulary=vocabulary)[0]
    out = run("bench_serve.py", bundle, "--n", 30, "--queries", 12, "--images", 3, "--work", tmp_path / "work")
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout)
    assert record["text_query_api"]["n"] == 12 and record["image_upload_api"]["n"] == 3
    assert 0 < record["text_query_in_process"]["p50_ms"] < record["text_query_api"]["p50_ms"]
