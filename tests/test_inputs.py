"""``cmhash.inputs`` streams a collection: :func:`iter_collection` gives, one at a time, the
records a whole read gives (same numbers, names, order and contents) for folders with
nested and odd names, file lists with every line break ``str.splitlines`` knows, and
manifests; its checks (nothing to encode, texts given as images, bytes that are not UTF-8)
come when the iteration ends, before ``cmhash encode`` encodes anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cmhash.errors import EncodeJobError
from cmhash.inputs import IMAGE_SUFFIXES, iter_collection, iter_manifest, read_collection, read_manifest

ODD_NAMES = [
    "a-b.txt", "a/b.txt", "a0.txt", "a.txt", "a/b/c.txt", "a/b-c.txt", "a/b.c/d.txt", "a b/x.txt", "a!/x.txt",
    "A.txt", ".hidden.txt", " lead.txt", "é.txt", "z/é/😀.txt", "z/e\u0301.txt", "ab/c.TXT", "x.txt/inner.txt",
    "#/~.txt", "a.b/c.txt", "aa/a.txt", "a/a/a/a.txt",
]


def walk_reference(root: Path, suffixes) -> list[str]:
    """The order the records follow: every matching file's relative path, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in suffixes and not p.is_dir())


@pytest.fixture
def text_folder(tmp_path):
    root = tmp_path / "docs"
    for i, name in enumerate(ODD_NAMES):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"text {i} of {name}")
    (root / "undecodable.txt").write_bytes(b"caf\xe9")
    os.mkfifo(root / "a" / "fifo.txt")
    (root / "notes.md").write_text("not a text item")
    (root / "link.txt").symlink_to(root / "a.txt")
    (root / "dirlink").symlink_to(root / "a", target_is_directory=True)  # not followed, as rglob does
    (root / "dirlink.txt").symlink_to(root / "z", target_is_directory=True)  # a link to a folder: not an item
    try:
        (root / os.fsdecode(b"\xff-bytes.txt")).write_text("a name that is not UTF-8")
    except (OSError, UnicodeEncodeError):  # a file system that refuses such names
        pass
    return root


def test_folder_records_follow_the_sorted_relative_paths(text_folder):
    records = list(iter_collection(text_folder, "text"))
    names = walk_reference(text_folder, (".txt",))
    assert [r.name for r in records] == names and set(ODD_NAMES) < set(names)
    assert [r.number for r in records] == list(range(len(names)))
    assert names.index("a-b.txt") < names.index("a/b.txt") < names.index("a0.txt")  # "-" < "/" < "0"
    by_name = {r.name: r for r in records}
    for i, name in enumerate(ODD_NAMES):
        assert by_name[name].text == f"text {i} of {name}" and by_name[name].problem is None
    assert "UTF-8" in by_name["undecodable.txt"].problem and "not a regular file" in by_name["a/fifo.txt"].problem
    assert by_name["link.txt"].text == by_name["a.txt"].text
    assert read_collection(text_folder, "text") == records

    unread = list(iter_collection(text_folder, "text", read_texts=False))
    assert [(r.number, r.name, r.image) for r in unread] == [(r.number, r.name, r.image) for r in records]
    assert all(r.text is None for r in unread)


def test_image_folder_records(tmp_path):
    root = tmp_path / "photos"
    names = ["b/1.jpg", "b-1.PNG", "b/a/2.webp", "b.c/3.tif", "c.jpg", "c.jpg.txt", "d/.x.jpeg", "d/e.gif"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not really an image")
    (root / "folder.jpg").mkdir()
    records = list(iter_collection(root, "image"))
    expected = walk_reference(root, IMAGE_SUFFIXES)
    assert [r.name for r in records] == expected and "c.jpg.txt" not in expected and "folder.jpg" not in expected
    assert [r.image for r in records] == [root / n for n in expected]
    assert [r.number for r in records] == list(range(len(expected)))


def test_file_list_lines_are_cut_as_splitlines_cuts_them(tmp_path):
    breaks = "one\r\ntwo\rthree\x0bfour\x0cfive\x1csix\x1dseven\x1eeight\x85nine\u2028ten\u2029eleven\n"
    text = "\ufeffzero\n\n   \n" + breaks + "\r\n  indented  \nlast without a newline"
    listing = tmp_path / "texts.txt"
    listing.write_bytes(text.encode("utf-8"))
    expected = [(f"line {n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = list(iter_collection(listing, "text"))
    assert [(r.name, r.text) for r in records] == expected
    assert [r.number for r in records] == list(range(len(expected)))
    assert read_collection(listing, "text") == records

    paths = tmp_path / "paths.txt"
    paths.write_text("a.jpg\n\n sub/b.png \r\n/abs/c.jpg\n")
    assert [(r.number, r.name, r.image) for r in iter_collection(paths, "image")] == [
        (0, "a.jpg", tmp_path / "a.jpg"), (1, "sub/b.png", tmp_path / "sub" / "b.png"),
        (2, "/abs/c.jpg", Path("/abs/c.jpg"))]


def test_manifests_row_by_row(tmp_path):
    rows = [{"id": "x", "text": "a cat", "labels": ["a"]}, {"image": "p/1.jpg", "tags": [1, 2]}, {"text": 5}]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\r\n{broken\n" + json.dumps(rows[2]))
    records = list(iter_collection(jsonl, "text"))
    assert records == read_manifest(jsonl) == list(iter_manifest(jsonl))
    assert [(r.number, r.name) for r in records] == [(0, "x"), (1, "p/1.jpg"), (2, "m.jsonl:4"), (3, "m.jsonl:5")]
    assert records[0].text == "a cat" and records[0].labels == ("a",) and records[1].tags == (1, 2)
    assert records[1].image == tmp_path / "p" / "1.jpg" and "not valid JSON" in records[2].problem
    assert "'text' must be a string" in records[3].problem

    csv_file = tmp_path / "m.csv"
    csv_file.write_text("id,text,tags\r\nx,a cat,sky|sea\r\ny,,dog\r\n")
    records = list(iter_collection(csv_file, "text"))
    assert [(r.number, r.name, r.text, r.tags, r.where) for r in records] == [
        (0, "x", "a cat", ("sky", "sea"), "m.csv:2"), (1, "y", "", ("dog",), "m.csv:3")]


def test_checks_come_at_the_end_of_the_iteration(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncodeJobError, match="holds no texts to encode"):
        list(iter_collection(tmp_path / "empty", "text"))
    texts = tmp_path / "queries.txt"
    texts.write_text("a cat on the beach\nsnow at night\n")
    stream = iter_collection(texts, "image")
    assert next(stream).name == "a cat on the beach"  # a line is an item until the list is seen whole
    with pytest.raises(EncodeJobError, match="--modality text"):
        list(stream)
    with pytest.raises(EncodeJobError, match="--modality text"):
        read_collection(texts, "image")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(EncodeJobError, match=r"not UTF-8 text \(line 2"):
        list(iter_collection(bad, "text"))
