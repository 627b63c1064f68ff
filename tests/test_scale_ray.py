"""Encoding on Ray Data, on a real local Ray cluster (2 CPUs, started once for the module):
``HashBatches`` in a user's own pipeline, ``encode_with_ray`` on every input form giving the
codes of ``cmhash encode``, the CLI form, and a resume after a real SIGKILL of the driver."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("fsspec")
pytest.importorskip("onnx", reason="the tests build their ONNX towers with the onnx package")

from cmhash.cli import main  # noqa: E402
from cmhash.encoder import Encoder  # noqa: E402
from cmhash.errors import EncodeJobError  # noqa: E402
from cmhash.offline import encode_collection  # noqa: E402
from cmhash.parquet import read_codes  # noqa: E402
from cmhash.scale import HashBatches, encode_with_ray  # noqa: E402

from fixtures.data import DATA  # noqa: E402
from fixtures.towers import make_bundle  # noqa: E402

PHOTOS = sorted((DATA / "mirflickr-mini" / "images").glob("*.jpg"))[:16]
RAY_ARGS = dict(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(**RAY_ARGS)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle", bits=32, image_size=32)[0]


@pytest.fixture(scope="module")
def encoder(bundle):
    return Encoder.load(bundle, threads=1)


def photo(i: int) -> Image.Image:
    if PHOTOS:
        return Image.open(PHOTOS[i]).convert("RGB")
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (40 + i, 50, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """16 images (real photos where present) in two sub-folders, plus 3 unreadable files."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(16):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        photo(i).save(sub / f"img{i:02d}.{['jpg', 'png'][i % 2]}")
    (root / "truncated.jpg").write_bytes((root / "b" / "img00.jpg").read_bytes()[:200])
    (root / "empty.png").write_bytes(b"")
    (root / "text_pretending.jpg").write_bytes(b"hello, I am not an image")
    return root


def local_codes(bundle, source, out, **kwargs):
    """What ``cmhash encode`` gives: ids, codes, error ids."""
    encode_collection(bundle, source, out, **kwargs)
    with np.load(out / "codes.npz", allow_pickle=False) as z:
        errors = [json.loads(line)["id"] for line in (out / "errors.jsonl").read_text().splitlines()]
        return z["ids"], z["codes"], sorted(errors)


def ray_codes(out):
    got = read_codes(out / "codes")
    order = np.argsort(got.ids)
    errors = pq.read_table(out / "errors").column("id").to_pylist()
    return got.ids[order], got.codes[order], sorted(errors), got


def test_hash_batches_in_a_users_pipeline(bundle, encoder):
    good = [io.BytesIO() for _ in range(5)]
    for i, buffer in enumerate(good):
        photo(i).save(buffer, "JPEG")
    items = [b.getvalue() for b in good] + [b"not an image", None]
    ds = ray.data.from_items([{"id": 100 + i, "image": item} for i, item in enumerate(items)])
    rows = ds.map_batches(HashBatches, fn_constructor_args=(bundle,),
                          fn_constructor_kwargs={"modality": "image", "column": "image"},
                          compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, batch_size=3).take_all()
    rows.sort(key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(100, 107))
    expected = encoder.hash_images([Image.open(b) for b in good])
    assert [r["code"] for r in rows[:5]] == [c.tobytes() for c in expected]
    assert all(r["reason"] is None for r in rows[:5])
    assert rows[5]["code"] is None and "ImageDecodeError" in rows[5]["reason"]
    assert rows[6]["code"] is None and "missing" in rows[6]["reason"]


def test_hash_batches_texts(bundle, encoder):
    texts = ["a cat on a sofa", "dog and sky", "zzzz qqqq"]
    table = pa.table({"id": [0, 1, 2], "text": texts})
    out = HashBatches(bundle, modality="text", column="text")(table)
    assert out.column("code").to_pylist()[:2] == [c.tobytes() for c in encoder.hash_texts(texts[:2])]
    assert out.column("reason").to_pylist()[2] == "no word of the text is in the bundle's vocabulary"
    with pytest.raises(ValueError, match="column 'item'"):
        HashBatches(bundle, modality="text")(table)


def test_folder_gives_the_codes_of_cmhash_encode(bundle, folder, tmp_path):
    ids, codes, errors = local_codes(bundle, folder, tmp_path / "local")
    summary = encode_with_ray(bundle, folder, tmp_path / "ray", chunk_size=5, batch_size=4)
    assert (summary["items"], summary["encoded"], summary["errors"], summary["parts"]) == (19, 16, 3, 4)
    got_ids, got_codes, got_errors, got = ray_codes(tmp_path / "ray")
    assert np.array_equal(got_ids, ids) and np.array_equal(got_codes, codes) and got_errors == errors
    assert got.bits == 32 and got.bundle_fingerprint == Encoder.load(bundle).fingerprint
    reasons = pq.read_table(tmp_path / "ray" / "errors").to_pylist()
    assert {r["item"] for r in reasons} == {"truncated.jpg", "empty.png", "text_pretending.jpg"}
    with pytest.raises(EncodeJobError, match="--resume"):
        encode_with_ray(bundle, folder, tmp_path / "ray", chunk_size=5)
    assert encode_with_ray(bundle, folder, tmp_path / "ray", chunk_size=5, resume=True) == summary  # finished


def test_file_list_and_text_manifest(bundle, folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(["b/img00.jpg", "missing.jpg", "a/img01.png"]) + "\n")
    (tmp_path / "b").symlink_to(folder / "b")
    (tmp_path / "a").symlink_to(folder / "a")
    ids, codes, errors = local_codes(bundle, listing, tmp_path / "local")
    encode_with_ray(bundle, listing, tmp_path / "ray", chunk_size=2)
    got_ids, got_codes, got_errors, _ = ray_codes(tmp_path / "ray")
    assert np.array_equal(got_ids, ids) and np.array_equal(got_codes, codes) and got_errors == errors == [1]

    manifest = tmp_path / "texts.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [{"text": "a cat"}, {"tags": ["dog", "sky"]}, {"tags": [0, 3]},
                                                          {"text": "qqq"}, {"image": "x.jpg"}]) + "\n")
    ids, codes, errors = local_codes(bundle, manifest, tmp_path / "local_t", modality="text")
    encode_with_ray(bundle, manifest, tmp_path / "ray_t", modality="text", chunk_size=2)
    got_ids, got_codes, got_errors, _ = ray_codes(tmp_path / "ray_t")
    assert np.array_equal(got_ids, ids) and np.array_equal(got_codes, codes) and got_errors == errors == [3, 4]


def test_parquet_input_of_image_bytes_and_paths(bundle, encoder, folder, tmp_path):
    paths = sorted(str(p) for p in folder.rglob("img*"))
    data = [Path(p).read_bytes() for p in paths] + [b"broken", None]
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(pa.table({"image": data[:10]}), source / "0.parquet", row_group_size=4)
    pq.write_table(pa.table({"image": data[10:]}), source / "1.parquet")
    summary = encode_with_ray(bundle, source, tmp_path / "out")
    assert (summary["parts"], summary["encoded"], summary["errors"]) == (4, 16, 2)
    got_ids, got_codes, got_errors, _ = ray_codes(tmp_path / "out")
    assert np.array_equal(got_ids, np.arange(16)) and got_errors == [16, 17]
    assert np.array_equal(got_codes, encoder.hash_images(paths))

    listing = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"file": paths[:3], "name": ["x", "y", "z"]}), listing)
    with pytest.raises(EncodeJobError, match="--column"):
        encode_with_ray(bundle, listing, tmp_path / "out2")
    encode_with_ray(bundle, listing, tmp_path / "out2", column="file")
    got = read_codes(tmp_path / "out2" / "codes")
    assert list(got.names) == ["x", "y", "z"] and np.array_equal(got.codes, encoder.hash_images(paths[:3]))


KILLED_RUN = """
import os, signal, sys
import ray
from cmhash.scale import encode_with_ray

ray.init(address=sys.argv[4], log_to_driver=False)  # the test's cluster: the driver dies, the cluster stays

def progress(done, total, seconds):
    if done >= 6:  # two parts of three items finished: the driver dies here
        os.kill(os.getpid(), signal.SIGKILL)

encode_with_ray(sys.argv[1], sys.argv[2], sys.argv[3], chunk_size=3, actors=1, progress=progress)
"""


def test_resume_after_a_kill_redoes_only_the_rest(bundle, folder, tmp_path):
    ids, codes, errors = local_codes(bundle, folder, tmp_path / "local")
    out = tmp_path / "job"
    address = ray.get_runtime_context().gcs_address
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(bundle), str(folder), str(out), address],
                            capture_output=True, timeout=120)
    stderr = killed.stderr
    assert killed.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    finished = sorted((out / "codes").glob("part-*.parquet"))
    assert 2 <= len(finished) < 7  # 19 items in 7 parts of 3
    before = {p.name: p.stat().st_mtime_ns for p in finished}
    assert not (out / "summary.json").exists()

    with pytest.raises(EncodeJobError, match="chunk_size"):
        encode_with_ray(bundle, folder, out, chunk_size=4, resume=True)
    summary = encode_with_ray(bundle, folder, out, chunk_size=3, resume=True)
    finished_items = sum(pq.read_metadata(p).num_rows + pq.read_metadata(out / "errors" / p.name).num_rows
                         for p in finished)
    assert summary["items_this_run"] == 19 - finished_items
    assert {p.name: p.stat().st_mtime_ns for p in finished} == before  # kept, not redone
    got_ids, got_codes, got_errors, _ = ray_codes(out)
    assert np.array_equal(got_ids, ids) and np.array_equal(got_codes, codes) and got_errors == errors


def test_cli_engine_ray(bundle, folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["encode", str(bundle), str(folder), "--out", str(out), "--engine", "ray", "--chunk-size", "8",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["engine"], summary["encoded"], summary["errors"]) == ("ray", 16, 3)
    assert main(["encode", str(bundle), str(folder), "--out", str(tmp_path / "o2"), "--engine", "ray",
                 "--shard", "1/2"]) == 2
    assert "--shard" in capsys.readouterr().err
    assert main(["encode", str(bundle), str(folder), "--out", str(tmp_path / "o3"), "--address", "auto"]) == 2
    assert "--engine ray" in capsys.readouterr().err
