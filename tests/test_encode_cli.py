"""``cmhash encode`` and ``cmhash bench`` on bundles of tiny towers (no torch needed): every
input form, unreadable items listed, shards, resume after a real SIGKILL, and the output
going straight into ``HashIndex`` / ``cmhash index build``."""

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

from cmhash.cli import main
from cmhash.encoder import Encoder
from cmhash.errors import EncodeJobError
from cmhash.index import HashIndex
from cmhash.offline import encode_collection, parse_shard

pytest.importorskip("onnx", reason="the tests build their ONNX towers with the onnx package")
pytest.importorskip("onnxruntime")

from fixtures.data import DATA  # noqa: E402
from fixtures.towers import make_bundle  # noqa: E402

PHOTOS = sorted((DATA / "mirflickr-mini" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle", bits=32, image_size=32)[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 images (real photos where present) of several formats, plus 4 unreadable files."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(40):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        if PHOTOS:
            image = Image.open(PHOTOS[i]).convert("RGB")
        else:
            image = Image.fromarray(rng.integers(0, 256, (30 + i, 50, 3), dtype=np.uint8))
        image.save(sub / f"img{i:02d}.{['jpg', 'png', 'webp'][i % 3]}")
    good = (root / "b" / "img00.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[:200])
    (root / "empty.png").write_bytes(b"")
    (root / "text_pretending.jpg").write_bytes(b"hello, I am not an image")
    big = io.BytesIO()
    Image.new("L", (12000, 10000)).save(big, "PNG")  # a decompression bomb for the default limit
    (root / "bomb.png").write_bytes(big.getvalue())
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


def load_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_folder_codes_ids_errors_and_index(bundle, folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["encode", str(bundle), str(folder), "--out", str(out), "--batch-size", "8", "--workers", "3",
                 "--chunk-size", "16"]) == 0
    assert "40 of 44 items encoded" in capsys.readouterr().out
    result = load_npz(out / "codes.npz")
    assert result["codes"].dtype == np.uint8 and result["codes"].shape == (40, 4)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["item"] for e in errors) == ["bomb.png", "empty.png", "text_pretending.jpg", "truncated.jpg"]
    reasons = {e["item"]: e["reason"] for e in errors}
    assert "0 bytes" in reasons["empty.png"] and "ImageTooLargeError" in reasons["bomb.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["items"], summary["encoded"], summary["errors"]) == (44, 40, 4)
    assert not (out / "parts").exists()

    # ids are positions in the sorted collection; codes equal Encoder's own, item by item
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix != ".txt" and p.is_file())
    assert [names[i] for i in result["ids"]] == list(result["names"])
    enc = Encoder.load(bundle, threads=1)
    assert np.array_equal(result["codes"], enc.hash_images([folder / n for n in result["names"]]))
    assert str(result["bundle_fingerprint"]) == summary["bundle_fingerprint"] == enc.fingerprint

    index = HashIndex(32)
    index.add(result["codes"], result["ids"])
    dist, ids = index.search(result["codes"][:3], 1)
    assert np.array_equal(ids[:, 0], result["ids"][:3]) and (dist[:, 0] == 0).all()
    assert main(["index", "build", str(out / "codes.npz"), "--out", str(tmp_path / "idx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 40


def test_index_build_refuses_to_overwrite_without_force(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.integers(0, 256, (5, 4), dtype=np.uint8))
    np.save(tmp_path / "b.npy", rng.integers(0, 256, (7, 4), dtype=np.uint8))
    idx = tmp_path / "idx"
    assert main(["index", "build", str(tmp_path / "a.npy"), "--out", str(idx)]) == 0
    before = idx.read_bytes()
    capsys.readouterr()
    assert main(["index", "build", str(tmp_path / "b.npy"), "--out", str(idx)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--force" in err
    assert idx.read_bytes() == before  # untouched
    assert main(["index", "build", str(tmp_path / "b.npy"), "--out", str(idx), "--force"]) == 0
    assert len(HashIndex.load(idx)) == 7


def test_file_list_and_manifest_inputs(bundle, folder, tmp_path):
    paths = sorted((folder / "a").glob("*"))[:5]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([str(p) for p in paths] + ["", "missing.jpg"]) + "\n")
    summary = encode_collection(bundle, listing, tmp_path / "l", workers=2)
    assert (summary["items"], summary["encoded"], summary["errors"]) == (6, 5, 1)
    assert "not found" in (tmp_path / "l" / "errors.jsonl").read_text()

    manifest = tmp_path / "m.jsonl"
    records = [{"id": f"doc{i}", "image": str(p), "text": "a cat on the beach" if i % 2 else "snow at night"}
               for i, p in enumerate(paths)]
    manifest.write_text("\n".join(json.dumps(r) for r in records) + "\n{broken json\n"
                        + json.dumps({"id": "no-text", "image": str(paths[0])}) + "\n")
    images = encode_collection(bundle, manifest, tmp_path / "mi")
    texts = encode_collection(bundle, manifest, tmp_path / "mt", modality="text")
    assert (images["encoded"], images["errors"]) == (6, 1)
    assert (texts["encoded"], texts["errors"]) == (5, 2)
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "mt" / "errors.jsonl").read_text().splitlines()]
    assert any("not valid JSON" in r for r in reasons) and any("no 'text' or 'tags'" in r for r in reasons)
    got = load_npz(tmp_path / "mt" / "codes.npz")
    assert list(got["names"]) == [f"doc{i}" for i in range(5)]
    enc = Encoder.load(bundle)
    assert np.array_equal(got["codes"], enc.hash_texts([r["text"] for r in records]))

    csv_file = tmp_path / "m.csv"
    csv_file.write_text("id,text,tags\nx,a cat,sky|sea\ny,,dog\n")
    assert encode_collection(bundle, csv_file, tmp_path / "csv", modality="text")["encoded"] == 2
    assert np.array_equal(load_npz(tmp_path / "csv" / "codes.npz")["codes"],
                          enc.hash_texts([["a cat", "sky", "sea"], ["dog"]]))


def test_tag_indices_outside_the_model_are_listed_not_wrapped(bundle, tmp_path):
    """A negative column index is out of range (as in training), never numpy's last column."""
    dim = Encoder.load(bundle).text_dim
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"id": i, "tags": tags}) for i, tags in
                                  enumerate([[0, 2], [-1, 2], ["-1"], [dim]])) + "\n")
    summary = encode_collection(bundle, manifest, tmp_path / "o", modality="text")
    assert (summary["encoded"], summary["errors"]) == (1, 3)
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "o" / "errors.jsonl").read_text().splitlines()]
    assert sum("tag index -1 is outside" in r for r in reasons) == 2 and f"tag index {dim} is outside" in reasons[2]


def test_text_folder_and_list_with_bad_bytes(bundle, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "1.txt").write_text("a dog in the snow")
    (docs / "2.txt").write_text("")  # no known word: the empty text's code, shared by every such item
    (docs / "3.txt").write_bytes(b"caf\xe9 latin-1")
    (docs / "4.txt").write_text("word " * 200_000 + "cat")
    (docs / "5.txt").write_text("zzzz qqqq")
    summary = encode_collection(bundle, docs, tmp_path / "o", modality="text")
    assert (summary["encoded"], summary["errors"]) == (2, 3)
    reasons = {e["item"]: e["reason"] for e in map(json.loads, (tmp_path / "o" / "errors.jsonl").read_text().splitlines())}
    assert "UTF-8" in reasons["3.txt"] and "vocabulary" in reasons["2.txt"] and "vocabulary" in reasons["5.txt"]
    enc = Encoder.load(bundle)
    codes = load_npz(tmp_path / "o" / "codes.npz")["codes"]
    assert np.array_equal(codes, enc.hash_texts(["a dog in the snow", "cat"]))

    lines = tmp_path / "lines.txt"
    lines.write_text("sunset over the sea\n\nstreet at night\n")
    summary = encode_collection(bundle, lines, tmp_path / "p", modality="text")
    assert summary["encoded"] == 2


def test_shards_partition_the_collection(bundle, folder, tmp_path):
    whole = encode_collection(bundle, folder, tmp_path / "all", chunk_size=7)
    full = load_npz(tmp_path / "all" / "codes.npz")
    parts = [load_npz(tmp_path / f"s{i}" / "codes.npz") for i in range(3)
             if encode_collection(bundle, folder, tmp_path / f"s{i}", shard=f"{i}/3", chunk_size=7)]
    ids = np.concatenate([p["ids"] for p in parts])
    assert len(ids) == len(set(ids.tolist())) == whole["encoded"]
    order = np.argsort(ids)
    assert np.array_equal(ids[order], full["ids"])
    assert np.array_equal(np.concatenate([p["codes"] for p in parts])[order], full["codes"])
    index = HashIndex(32)
    for p in parts:  # shards go into one index without id clashes
        index.add(p["codes"], p["ids"])
    assert len(index) == 40
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(EncodeJobError, match="shard"):
            parse_shard(bad)


# `cmhash encode` in a process that dies (SIGKILL) with its fourth part file half written:
# the real temporary file of the real atomic write, killed before the rename.
KILLED_RUN = """
import os, signal, sys
from cmhash import files, offline
from cmhash.cli import main

parts = []

def atomic_write(path, data):
    if path.name.startswith("part-"):
        parts.append(path)
        if len(parts) == 4:
            with files.atomic_path(path) as tmp:
                tmp.write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
    return files.atomic_write(path, data)

offline.atomic_write = atomic_write
sys.exit(main(["encode", sys.argv[1], sys.argv[2], "--out", sys.argv[3], "--chunk-size", "6", "--batch-size", "4",
               "--workers", "2", "--json"]))
"""


def test_resume_after_a_kill_loses_and_repeats_nothing(bundle, folder, tmp_path):
    reference = tmp_path / "ref"
    encode_collection(bundle, folder, reference, chunk_size=6)
    out = tmp_path / "job"
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(bundle), str(folder), str(out)],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(list((out / "parts").glob("part-*.npz"))) == 3
    assert list((out / "parts").glob(".part-*.tmp"))  # the fourth part was half written
    assert not (out / "codes.npz").exists()

    with pytest.raises(EncodeJobError, match="--resume"):
        encode_collection(bundle, folder, out, chunk_size=6)
    with pytest.raises(EncodeJobError, match="chunk_size"):
        encode_collection(bundle, folder, out, chunk_size=5, resume=True)
    summary = encode_collection(bundle, folder, out, chunk_size=6, resume=True, batch_size=3)
    assert summary["items_this_run"] == 44 - 18 and summary["encoded"] == 40 and summary["errors"] == 4
    got, ref = load_npz(out / "codes.npz"), load_npz(reference / "codes.npz")
    assert np.array_equal(got["ids"], ref["ids"]) and np.array_equal(got["codes"], ref["codes"])
    assert (out / "errors.jsonl").read_text() == (reference / "errors.jsonl").read_text()
    assert encode_collection(bundle, folder, out, chunk_size=6, resume=True)["encoded"] == 40  # finished: a no-op


def test_output_folder_that_is_not_a_job_is_refused(bundle, folder, tmp_path, capsys):
    (tmp_path / "stuff.txt").write_text("mine")
    assert main(["encode", str(bundle), str(folder), "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["encode", str(bundle), str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_input_of_the_other_modality_is_an_error_naming_the_option(bundle, folder, tmp_path, capsys):
    """A text list, a text folder or a texts-only manifest under the image modality (and
    images under text) fail with exit 2 and the option meant, never "0 of N encoded"."""
    queries = tmp_path / "queries.txt"
    queries.write_text("a cat on the beach\nsnow at night\n")
    assert main(["encode", str(bundle), str(queries), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--modality text" in err
    assert not (tmp_path / "q").exists()  # refused by the first pass over the input, before any job
    assert main(["encode", str(bundle), str(queries), "--out", str(tmp_path / "q2"), "--modality", "text"]) == 0

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "1.txt").write_text("a dog")
    assert main(["encode", str(bundle), str(docs), "--out", str(tmp_path / "d")]) == 2
    assert "--modality text" in capsys.readouterr().err
    assert main(["encode", str(bundle), str(folder / "a"), "--out", str(tmp_path / "i"), "--modality", "text"]) == 2
    assert "--modality image" in capsys.readouterr().err

    manifest = tmp_path / "texts.jsonl"
    manifest.write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(["a cat", "a dog"])) + "\n")
    with pytest.raises(EncodeJobError, match=r"none of the 2 items.*--modality text"):
        encode_collection(bundle, manifest, tmp_path / "m")
    assert len((tmp_path / "m" / "errors.jsonl").read_text().splitlines()) == 2  # the reasons stay listed


def test_every_item_failing_is_an_error(bundle, folder, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("missing1.jpg\nmissing2.jpg\n")
    assert main(["encode", str(bundle), str(listing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 items could be encoded" in err and "missing1.jpg" in err and "--modality" not in err
    # resuming the finished job fails alike instead of reporting success
    assert main(["encode", str(bundle), str(listing), "--out", str(tmp_path / "o"), "--resume"]) == 2


def test_bench_table_json_and_markdown(bundle, tmp_path, capsys):
    """One row per variant, format and provider, measured in fresh processes; --json and
    --markdown carry the same rows."""
    args = ["bench", str(bundle), "--cold-runs", "1", "--repeats", "3", "--warmup", "1", "--threads", "1", "--quiet"]
    assert main([*args, "--json", "--out", str(tmp_path / "b.json")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads((tmp_path / "b.json").read_text())
    (row,) = record["rows"]
    assert (row["variant"], row["format"], row["provider"]) == ("fp32", "onnx", "CPUExecutionProvider")
    assert row["provider_used"] == "CPUExecutionProvider"
    assert 0 < row["cold_start_s"] < 60 and row["peak_rss_mb"] > 10 and 0 < row["p50_ms"] <= row["p99_ms"]
    assert row["items_per_s"] > 0 and row["bit_agreement"] == 1.0  # fp32 against itself
    assert "map_i2t" not in row and record["data"].startswith("random inputs")  # no reference inputs, no labels
    assert row["mb"] == round(((bundle / "image.onnx").stat().st_size + (bundle / "text.onnx").stat().st_size) / 1e6, 2)
    assert main([*args, "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| variant | format | provider | MB | cold start s |") and lines[1].startswith("|---|")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["fp32", "onnx", "CPU"] and float(cells[4]) == pytest.approx(row["cold_start_s"], abs=30)
    assert "pytorch" not in "\n".join(lines)  # no checkpoint: no PyTorch row


def test_progress_rate_counts_only_this_runs_items():
    import io

    from cmhash.offline import Progress

    out = io.StringIO()
    progress = Progress(stream=out)
    progress(600, 1000, 0.0)  # an earlier run finished 600 items
    progress(700, 1000, 2.0)  # this run: 100 items in 2 s
    last = out.getvalue().splitlines()[-1]
    assert "700/1000 items" in last and " 50.0 items/s" in last and "ETA 0:00:06" in last, last


def test_a_job_of_another_format_version_is_not_resumed(bundle, tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("a cat\n")
    encode_collection(bundle, lines, tmp_path / "o", modality="text")
    job = json.loads((tmp_path / "o" / "job.json").read_text())
    (tmp_path / "o" / "job.json").write_text(json.dumps({**job, "version": 1}))
    with pytest.raises(EncodeJobError, match="another cmhash version.*new folder"):
        encode_collection(bundle, lines, tmp_path / "o", modality="text", resume=True)


def test_streamed_npz_loads_as_np_savez_wrote_it(tmp_path):
    """codes.npz is written a part at a time; np.load gives what np.savez of the whole
    arrays gives, dtypes included (the names' width is the longest name's)."""
    from cmhash.offline import _write_npz

    rng = np.random.default_rng(0)
    sizes = [3, 0, 5, 1]
    codes = [rng.integers(0, 256, (n, 8), dtype=np.uint8) for n in sizes]
    ids = [rng.integers(0, 2**40, n) for n in sizes]
    names = [np.asarray([f"{'é' * k}{k}" for k in range(n)], dtype=str) for n in sizes]
    fingerprint = np.asarray("f" * 64)
    whole = {"codes": np.concatenate(codes), "ids": np.concatenate(ids), "names": np.concatenate(names),
             "bundle_fingerprint": fingerprint}
    np.savez(tmp_path / "whole.npz", **whole)
    _write_npz(tmp_path / "streamed.npz", [
        ("codes", np.dtype(np.uint8), (9, 8), iter(codes)),
        ("ids", np.dtype(np.int64), (9,), iter(ids)),
        ("names", whole["names"].dtype, (9,), iter(names)),
        ("bundle_fingerprint", fingerprint.dtype, (), [fingerprint]),
    ])
    expected, got = load_npz(tmp_path / "whole.npz"), load_npz(tmp_path / "streamed.npz")
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and got[key].shape == expected[key].shape
        assert np.array_equal(got[key], expected[key])
    with pytest.raises(EncodeJobError, match="changed while"):  # fewer rows than the header says
        _write_npz(tmp_path / "short.npz", [("ids", np.dtype(np.int64), (10,), iter(ids))])
    assert not (tmp_path / "short.npz").exists()


def test_merged_names_have_the_width_of_the_longest(bundle, tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("cat\n" * 9 + "dog on the sofa\n" + "\n" * 3 + "sea\n")
    encode_collection(bundle, lines, tmp_path / "o", modality="text", chunk_size=3)
    got = load_npz(tmp_path / "o" / "codes.npz")
    names = [f"line {n}" for n in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 14]]
    assert got["names"].dtype == np.asarray(names).dtype and list(got["names"]) == names
    assert got["ids"].dtype == np.int64 and list(got["ids"]) == list(range(11))
    assert got["codes"].dtype == np.uint8 and got["codes"].shape == (11, 4)


@pytest.mark.parametrize("output_format", ["npz", "parquet"])
def test_peak_memory_does_not_grow_with_the_items(bundle, tmp_path, output_format):
    """tracemalloc's peak (Python objects and numpy arrays) while encoding N and 4N texts of
    a file list: every pass streams the input and the parts, so the peaks differ by a few
    bytes per item at most (an up-front list of records would add hundreds)."""
    import itertools
    import tracemalloc

    if output_format == "parquet":
        pytest.importorskip("pyarrow")
    from fixtures.towers import WORDS

    encoder = Encoder.load(bundle, threads=1)
    runs = itertools.count()

    def peak(n: int) -> int:
        source = tmp_path / f"texts-{n}.txt"
        source.write_text("".join(f"{WORDS[i % 12]} {WORDS[i * 7 % 12]} {WORDS[i * 5 % 11]}\n" for i in range(n)))
        tracemalloc.start()
        try:
            summary = encode_collection(None, source, tmp_path / f"out-{next(runs)}", encoder=encoder,
                                        modality="text", batch_size=64, workers=1, chunk_size=256,
                                        output_format=output_format)
            assert summary["encoded"] == n
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(300)  # first-use allocations (lazy imports, caches) out of the way
    # The least of two runs of each size: a global table that grows now and then (the
    # interned strings', which every new file name passes through) lands in one run at most.
    n = 2048  # whole chunks, so both sizes hold chunks of one size
    small, large = min(peak(n), peak(n)), min(peak(4 * n), peak(4 * n))
    assert (large - small) / (3 * n) < 16, (small, large)
