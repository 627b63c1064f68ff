"""Encode jobs against hostile inputs: a record that cannot be encoded goes to errors.jsonl
and the job goes on (resume too); nothing blocks; a kill at any point leaves a job that
``--resume`` completes."""

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from cmhash.cli import main
from cmhash.encoder import Encoder
from cmhash.inputs import is_index
from cmhash.offline import encode_collection

pytest.importorskip("onnx", reason="the tests build their ONNX towers with the onnx package")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from fixtures.towers import make_bundle  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle", bits=32, modalities=("text",),
                       with_vocabulary=False)[0]


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory):
    """With a vocabulary: takes raw texts."""
    return make_bundle(tmp_path_factory.mktemp("v") / "bundle", bits=32, modalities=("text",))[0]


def errors_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def test_digit_like_characters_are_words_not_indices():
    assert [is_index(x) for x in ["12", " 3 ", "-1", 7]] == [True, True, True, True]
    assert [is_index(x) for x in ["²", "٣", "-²", "1²", "", "-", "+1", True]] == [False] * 8


def test_a_superscript_tag_is_listed_and_the_job_goes_on(bundle, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "a", "tags": [0, 2]}, {"id": "b", "tags": ["²"]}, {"id": "c", "tags": ["3", "²"]},
            {"id": "d", "tags": ["1"]}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["encode", str(bundle), str(manifest), "--out", str(out), "--modality", "text", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["encoded"], summary["errors"]) == (2, 2)
    assert [e["item"] for e in errors_of(out)] == ["b", "c"]
    assert main(argv + ["--resume"]) == 0  # a finished job resumes to the same summary
    assert json.loads(capsys.readouterr().out)["encoded"] == 2
    with np.load(out / "codes.npz") as z:
        enc = Encoder.load(bundle)
        bow = np.zeros((2, enc.text_dim), np.float32)
        bow[0, [0, 2]] = bow[1, 1] = 1
        assert np.array_equal(z["codes"], enc.hash_texts(bow)) and list(z["ids"]) == [0, 3]


def test_a_fifo_named_txt_is_listed_not_read(text_bundle, tmp_path):
    bundle = text_bundle
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "1.txt").write_text("a cat on the beach")
    os.mkfifo(docs / "2.txt")
    result = {}

    def run():
        result["status"] = main(["encode", str(bundle), str(docs), "--out", str(tmp_path / "out"), "--modality", "text"])

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # unblock the reader so the test process can end, then fail
        with open(docs / "2.txt", "w"):
            pass
        pytest.fail("cmhash encode blocked on a FIFO")
    (error,) = errors_of(tmp_path / "out")
    assert error["item"] == "2.txt" and "not a regular file" in error["reason"]


KILL_IN_MERGE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import cmhash.offline as offline
    write = offline.atomic_write

    def die_after_codes(path, data):  # codes.npz is in place; the process dies before errors.jsonl
        if Path(path).name == "errors.jsonl":
            assert (Path(path).parent / "codes.npz").exists()
            os._exit(9)
        write(path, data)

    offline.atomic_write = die_after_codes
    offline.encode_collection(sys.argv[1], sys.argv[2], sys.argv[3], modality="text", chunk_size=2)
""")


def test_a_kill_inside_the_merge_leaves_a_resumable_job(text_bundle, tmp_path, capsys):
    bundle = text_bundle
    lines = tmp_path / "texts.txt"
    lines.write_text("cat\ndog on the sofa\n\nsea at sunset\nsnow\n")
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILL_IN_MERGE, str(bundle), str(lines), str(out)])
    assert killed.returncode == 9
    assert (out / "codes.npz").exists() and not (out / "summary.json").exists()
    assert main(["encode", str(bundle), str(lines), "--out", str(out), "--modality", "text", "--resume",
                 "--chunk-size", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["items"], summary["encoded"], summary["errors"]) == (4, 4, 0)
    assert (out / "errors.jsonl").read_text() == "" and not (out / "parts").exists()
    with np.load(out / "codes.npz") as z:
        assert list(z["ids"]) == [0, 1, 2, 3]


KILL_IN_STREAMED_MERGE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import cmhash.offline as offline
    import cmhash.parquet as parquet
    read_part, write_tables = offline._read_part, parquet.write_tables

    def die_in_names(out, k, *keys):  # codes.npz half written: its codes and ids members are in
        if keys == ("names",) and k == 1:
            os._exit(9)
        return read_part(out, k, *keys)

    def die_before_errors(tables, path, **kwargs):  # codes.parquet in place, errors.parquet not
        if Path(path).name == "errors.parquet":
            os._exit(9)
        write_tables(tables, path, **kwargs)

    offline._read_part, parquet.write_tables = die_in_names, die_before_errors
    offline.encode_collection(sys.argv[1], sys.argv[2], sys.argv[3], modality="text", chunk_size=2,
                              output_format=sys.argv[4])
""")


@pytest.mark.parametrize("output_format", ["npz", "parquet"])
def test_a_kill_while_the_merge_streams_leaves_a_resumable_job(text_bundle, tmp_path, output_format):
    if output_format == "parquet":
        pytest.importorskip("pyarrow")
    lines = tmp_path / "texts.txt"
    lines.write_text("cat\ndog on the sofa\n\nsea at sunset\nzzzz\nsnow\n")
    reference = encode_collection(text_bundle, lines, tmp_path / "ref", modality="text", chunk_size=2,
                                  output_format=output_format)
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILL_IN_STREAMED_MERGE, str(text_bundle), str(lines), str(out),
                             output_format])
    assert killed.returncode == 9
    assert not (out / "summary.json").exists() and len(list((out / "parts").glob("part-*.npz"))) == 3
    if output_format == "npz":
        assert not (out / "codes.npz").exists() and list(out.glob(".codes.npz.*.tmp"))  # the temporary, never renamed
    else:
        assert (out / "codes.parquet").exists() and not (out / "errors.parquet").exists()
    summary = encode_collection(text_bundle, lines, out, modality="text", chunk_size=2, resume=True,
                                output_format=output_format)
    assert (summary["items"], summary["encoded"], summary["errors"], summary["items_this_run"]) == (5, 4, 1, 0)
    assert not (out / "parts").exists()
    if output_format == "npz":  # the zip members carry their time: compare the arrays
        with np.load(out / "codes.npz") as got, np.load(tmp_path / "ref" / "codes.npz") as ref:
            assert all(np.array_equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref.files)
        assert (out / "errors.jsonl").read_text() == (tmp_path / "ref" / "errors.jsonl").read_text()
    else:
        for name in ("codes", "errors_file"):
            assert Path(summary[name]).read_bytes() == Path(reference[name]).read_bytes()


@pytest.mark.parametrize("option, value, error", [
    ("batch_size", 0, "InvalidArgumentError"), ("workers", -1, "InvalidArgumentError"),
    ("chunk_size", 2.5, "ArgumentTypeError"), ("batch_size", True, "ArgumentTypeError"),
])
def test_job_options_are_typed_errors(bundle, tmp_path, option, value, error):
    from cmhash import errors

    with pytest.raises(getattr(errors, error), match=option):
        encode_collection(bundle, tmp_path, tmp_path / "out", modality="text", **{option: value})


def test_a_fifo_given_as_the_input_list_is_refused_without_blocking(bundle, tmp_path, capsys):
    os.mkfifo(tmp_path / "list.txt")
    assert main(["encode", str(bundle), str(tmp_path / "list.txt"), "--out", str(tmp_path / "out"),
                 "--modality", "text"]) == 2
    assert "not a folder or a regular file" in capsys.readouterr().err
