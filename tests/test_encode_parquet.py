"""``cmhash encode --format parquet``: codes.parquet and errors.parquet hold what codes.npz and
errors.jsonl hold, and index build, search and codes loading read them directly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cmhash.cli import main
from cmhash.codefiles import load_codes
from cmhash.index import HashIndex

pytest.importorskip("onnx", reason="the tests build their ONNX towers with the onnx package")
pytest.importorskip("onnxruntime")
pytest.importorskip("pyarrow")

from fixtures.data import DATA  # noqa: E402
from fixtures.towers import make_bundle  # noqa: E402

PHOTOS = sorted((DATA / "mirflickr-mini" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One folder of 10 images and 2 unreadable files, encoded into npz and parquet."""
    root = tmp_path_factory.mktemp("enc")
    bundle = make_bundle(root / "bundle", bits=32, image_size=32)[0]
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        image = Image.open(PHOTOS[i]).convert("RGB") if PHOTOS else \
            Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8))
        image.save(photos / f"img{i:02d}.png")
    (photos / "empty.png").write_bytes(b"")
    (photos / "junk.jpg").write_bytes(b"not an image")
    for fmt in ("npz", "parquet"):
        assert main(["encode", str(bundle), str(photos), "--out", str(root / fmt), "--format", fmt,
                     "--chunk-size", "4", "--quiet"]) == 0
    return root


def test_parquet_output_matches_npz(job):
    from cmhash import parquet as cp

    out = job / "parquet"
    assert sorted(p.name for p in out.iterdir()) == ["codes.parquet", "errors.parquet", "job.json", "summary.json"]
    npz = load_codes(job / "npz" / "codes.npz")
    got = cp.read_codes(out / "codes.parquet")
    np.testing.assert_array_equal(got.codes, npz.codes)
    np.testing.assert_array_equal(got.ids, npz.ids)
    assert got.names == npz.names and len(got.names) == 10
    assert got.bits == 32 and got.bundle_fingerprint == npz.bundle_fingerprint is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["codes"].endswith("codes.parquet") and summary["errors_file"].endswith("errors.parquet")
    assert summary["bundle_fingerprint"] == got.bundle_fingerprint
    jsonl = [json.loads(line) for line in (job / "npz" / "errors.jsonl").read_text().splitlines()]
    assert cp.read_errors(out / "errors.parquet") == jsonl and len(jsonl) == 2


def test_index_build_and_search_read_parquet(job, tmp_path, capsys):
    codes_file = job / "parquet" / "codes.parquet"
    assert main(["index", "build", str(codes_file), "--out", str(tmp_path / "i.cmhidx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 10
    index = HashIndex.load(tmp_path / "i.cmhidx")
    direct = HashIndex.from_codes_file(codes_file)
    np.testing.assert_array_equal(index.ids, direct.ids)
    # queries and the index itself may both be Parquet
    for where in (tmp_path / "i.cmhidx", codes_file):
        assert main(["search", str(where), str(codes_file), "-k", "1", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        # each code finds itself, or an item with the same code (ties go to the lower id)
        found = np.searchsorted(index.ids, [row[0] for row in result["ids"]])
        np.testing.assert_array_equal(index.codes[found], index.codes)
        assert all(row[0] == 0 for row in result["distances"])


def test_resume_keeps_the_format(job, tmp_path):
    from cmhash.errors import EncodeJobError
    from cmhash.offline import encode_collection

    with pytest.raises(EncodeJobError, match="output_format"):
        encode_collection(job / "bundle", job / "photos", job / "parquet", resume=True, output_format="npz")
