"""``cmhash query`` and :class:`cmhash.query.Searcher` on real MIRFlickr photos and captions:
ranked ids, distances and the names ``cmhash encode`` recorded, checked against a HashIndex
of the Encoder's own codes; and the refusals (an unknown word, a missing image path, a bundle
that did not make the index, a k over the limit)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cmhash import limits
from cmhash.cli import main
from cmhash.errors import (BundleMismatchError, ImageNotFoundError, InvalidArgumentError, ResourceLimitError,
                           TextInputError, UnknownTextError)
from cmhash.query import Searcher

pytest.importorskip("onnx", reason="the test builds its ONNX towers with the onnx package")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    from fixtures.collection import make_collection

    return make_collection(tmp_path_factory.mktemp("collection"))


def query(capsys, *argv) -> tuple[int, str, str]:
    status = main(["query", *map(str, argv)])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_text_query_prints_ranked_photos_with_their_names(collection, capsys):
    caption = "a dog on a beach"
    status, out, _ = query(capsys, collection.bundle, collection.photo_index, "--text", caption, "-k", 7, "--json")
    assert status == 0
    record = json.loads(out)
    expected = collection.expected(collection.encoder.hash_text(caption), "image", 7)
    assert record["results"] == expected and len(expected) == 7
    assert all(hit["name"].endswith(".jpg") for hit in record["results"])
    status, out, _ = query(capsys, collection.bundle, collection.photo_index, "--text", caption, "--k", 7)
    lines = out.splitlines()
    assert status == 0 and lines[0].split() == ["rank", "distance", "id", "name"]
    assert [line.split() for line in lines[1:]] == [[str(h["rank"]), str(h["distance"]), str(h["id"]), h["name"]]
                                                    for h in expected]


def test_image_query_finds_captions_and_the_photo_itself(collection, capsys):
    photo = collection.photos / collection.photo_names[5]
    code = collection.encoder.hash(photo)
    status, out, _ = query(capsys, collection.bundle, collection.caption_index, "--image", photo, "-k", 5, "--json")
    assert status == 0
    assert json.loads(out)["results"] == collection.expected(code, "text", 5)
    status, out, _ = query(capsys, collection.bundle, collection.photo_index, "--image", photo, "-k", 3, "--json")
    first = json.loads(out)["results"][0]
    assert first["distance"] == 0 and first["name"] == collection.photo_names[5]


def test_radius_keeps_only_hits_within_it(collection):
    searcher = Searcher.open(collection.encoder, collection.photo_index)
    code = collection.encoder.hash_text("a photo of sky")
    everything = searcher.search_code(code, k=len(collection.photo_names))
    radius = everything[len(everything) // 3].distance
    hits = searcher.search_text("a photo of sky", k=50, radius=radius)
    assert [h.to_dict() for h in hits] == collection.expected(code, "image", 50, radius)
    assert hits and max(h.distance for h in hits) <= radius < everything[-1].distance


def test_a_text_with_no_known_word_is_refused_not_searched(collection, capsys):
    status, out, err = query(capsys, collection.bundle, collection.photo_index, "--text", "zebra xylophone")
    assert status == 2 and out == ""
    assert "no word of 'zebra xylophone' is in the bundle's vocabulary" in err and "such as" in err
    assert err.count("\n") == 1
    searcher = Searcher.open(collection.encoder, collection.photo_index)
    with pytest.raises(UnknownTextError):
        searcher.search_text("zebra")
    with pytest.raises(TextInputError, match="empty"):
        searcher.search_text("   ")


def test_a_missing_image_path_is_an_error_never_a_text(collection, capsys, tmp_path):
    for typo in ("a dog.jpg", tmp_path / "nothing.png", "photos/im1.jpgg"):
        status, out, err = query(capsys, collection.bundle, collection.photo_index, "--image", typo)
        assert status == 2 and out == "" and "image file not found" in err, err
    with pytest.raises(ImageNotFoundError):
        Searcher.open(collection.encoder, collection.photo_index).search_image(str(tmp_path / "a dog"))


def test_another_bundle_is_a_typed_error(collection, tmp_path, capsys):
    from fixtures.towers import make_bundle
    from cmhash.text import Vocabulary

    vocabulary = Vocabulary.build(collection.captions + ["a dog on a beach"])
    other = make_bundle(tmp_path / "other", bits=32, image_size=32, vocabulary=vocabulary, seed=1)[0]
    with pytest.raises(BundleMismatchError, match="holds codes of another bundle"):
        Searcher.open(other, collection.photo_index)
    wider = make_bundle(tmp_path / "wider", bits=64, image_size=32, vocabulary=vocabulary)[0]
    status, _, err = query(capsys, wider, collection.photo_index, "--text", "a dog")
    assert status == 2 and "32-bit codes but the bundle hashes to 64 bits" in err
    status, _, err = query(capsys, collection.photo_index, collection.bundle, "--text", "a dog")  # swapped
    assert status == 2 and "is a bundle, not an index; the arguments are BUNDLE INDEX" in err


def test_limits_on_k_and_text(collection, monkeypatch, capsys):
    searcher = Searcher.open(collection.encoder, collection.photo_index)
    monkeypatch.setattr(limits, "MAX_QUERY_K", 5)
    with pytest.raises(ResourceLimitError, match="k=6 is over the limit of 5"):
        searcher.search_text("a dog", k=6)
    assert len(searcher.search_text("a dog", k=5)) == 5
    with pytest.raises(InvalidArgumentError):
        searcher.search_text("a dog", k=0)
    with pytest.raises(InvalidArgumentError):
        searcher.search_text("a dog", k=1, radius=-1)
    monkeypatch.setattr(limits, "MAX_QUERY_TEXT_CHARS", 20)
    with pytest.raises(ResourceLimitError, match="over the limit of 20"):
        searcher.search_text("a dog " * 10, k=1)


def test_search_of_codes_prints_names_and_points_photos_to_query(collection, capsys, tmp_path):
    import numpy as np

    queries = tmp_path / "q.npy"
    np.save(queries, collection.encoder.hash_images([collection.photos / collection.photo_names[2]]))
    assert main(["search", str(collection.photo_index), str(queries), "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"query 0: 2 {collection.photo_names[2]} (0), ")
    for wrong in (collection.photos / collection.photo_names[0], collection.bundle):
        assert main(["search", str(collection.photo_index), str(wrong)]) == 2
        err = capsys.readouterr().err
        assert "cmhash query BUNDLE INDEX" in err and err.count("\n") == 1


def test_import_cmhash_loads_no_web_framework():
    script = ("import sys, cmhash, cmhash.cli, cmhash.query\n"
              "print(sorted(m for m in ('starlette', 'uvicorn', 'python_multipart', 'selenium') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_an_index_of_bare_codes_is_searched_with_a_warning(collection, tmp_path, capsys):
    import numpy as np

    from cmhash.errors import UncheckedIndexWarning

    bare = tmp_path / "codes.npy"
    np.save(bare, collection.encoder.hash_images([collection.photos / n for n in collection.photo_names[:5]]))
    assert main(["index", "build", str(bare), "--out", str(tmp_path / "bare.cmhidx")]) == 0
    with pytest.warns(UncheckedIndexWarning, match="does not record which bundle made its codes"):
        searcher = Searcher.open(collection.encoder, tmp_path / "bare.cmhidx")
    hits = searcher.search_image(collection.photos / collection.photo_names[1], k=2)
    assert hits[0].id == 1 and hits[0].distance == 0 and hits[0].name is None


def test_a_multi_index_answers_as_the_flat_index(collection, tmp_path, capsys):
    """``cmhash query`` opens any kind of index file; a MultiIndex of the same codes, names
    and metadata gives the flat index's answers."""
    from cmhash.index import MultiIndex, load_index

    flat = load_index(collection.photo_index)
    multi = MultiIndex(flat.bits, substrings=4, metadata=flat.metadata)
    multi.add(flat.codes, flat.ids, names=flat.names(flat.ids))
    multi.save(tmp_path / "photos-mih.cmhidx")
    answers = []
    for index in (collection.photo_index, tmp_path / "photos-mih.cmhidx"):
        status, out, _ = query(capsys, collection.bundle, index, "--text", "a photo of sky", "-k", 9, "--json")
        assert status == 0
        answers.append(json.loads(out)["results"])
    assert load_index(tmp_path / "photos-mih.cmhidx").kind == "mih"
    assert answers[0] == answers[1] and len(answers[0]) == 9


def test_a_sharded_index_answers_as_the_single_index(collection, tmp_path, capsys):
    """A folder of shards (one of them a multi-index) keeps names and the bundle fingerprint:
    ``cmhash query`` gives the single index's answers, and a shard of another bundle is refused."""
    from cmhash.index import HashIndex, MultiIndex, load_index

    whole = load_index(collection.photo_index)
    ids = whole.ids
    shards = tmp_path / "shards"
    shards.mkdir()
    half = len(ids) // 2  # contiguous shards: ties then fall in the single index's order
    for i, (cls, rows) in enumerate([(HashIndex, slice(0, half)), (MultiIndex, slice(half, None))]):
        shard = cls(whole.bits, metadata=whole.metadata)
        shard.add(whole.codes[rows], ids[rows], names=whole.names(ids[rows]))
        shard.save(shards / f"part-{i}.cmhidx")
    answers = []
    for index in (collection.photo_index, shards):
        status, out, _ = query(capsys, collection.bundle, index, "--text", "a dog on a beach", "-k", 8, "--json")
        assert status == 0
        answers.append(json.loads(out)["results"])
    assert answers[0] == answers[1] and len(answers[0]) == 8

    other = HashIndex(whole.bits, metadata={"bundle_fingerprint": "0" * 64})
    other.add(whole.codes[:1], [10**9])
    other.save(shards / "part-2.cmhidx")
    status, _, err = query(capsys, collection.bundle, shards, "--text", "a dog on a beach")
    assert status == 2 and "different bundles" in err
