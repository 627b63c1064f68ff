"""Bundles: writing (atomic), the manifest schema, the zip archive, and every way loading
refuses a bad bundle. Models here are opaque bytes: the bundle layer never parses them."""

import hashlib
import json
import os
import zipfile

import numpy as np
import pytest

import cmhash
from cmhash.bundle import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    image_modality,
    load_bundle,
    pack_archive,
    text_modality,
    validate_manifest,
    write_bundle,
)
from cmhash.errors import (
    BundleChecksumError,
    BundleError,
    BundleNotFoundError,
    BundleVersionError,
    CmhashError,
)
from cmhash.preprocess import ImagePreprocessor
from cmhash.text import Vocabulary

VOCAB = Vocabulary.from_words(["cat", "dog", "sea"])


def manifest(**changes):
    base = {
        "method": "egath",
        "bits": 16,
        "modalities": {
            "image": image_modality("image.onnx", ImagePreprocessor(image_size=32)),
            "text": text_modality("text.onnx", VOCAB.dim, vocabulary=VOCAB),
        },
        "label_names": ["animals", "sea"],
        "provenance": {"training_config": {"lr": 0.001}, "metrics": {"map_i2t": 0.81}},
    }
    base.update(changes)
    return base


FILES = {"image.onnx": b"image model bytes", "text.onnx": b"text model bytes", "vocab.json": VOCAB.to_json().encode()}


@pytest.fixture
def bundle_dir(tmp_path):
    return write_bundle(tmp_path / "bundle", manifest(), FILES)


def rewrite_manifest(directory, change):
    path = directory / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_write_then_load_round_trip(bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir)
    assert bundle.format_version == FORMAT_VERSION == "1.3"
    assert (bundle.method, bundle.bits, bundle.modalities) == ("egath", 16, ("image", "text"))
    assert bundle.label_names == ["animals", "sea"]
    assert dict(bundle.files) == FILES
    assert bundle.manifest["files"] == {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}
    assert bundle.manifest["provenance"]["cmhash_version"] == cmhash.__version__
    assert bundle.manifest["provenance"]["metrics"] == {"map_i2t": 0.81}
    assert bundle.image_preprocessor() == ImagePreprocessor(image_size=32)
    assert bundle.vocabulary() == VOCAB
    assert bundle.model_bytes("text") == b"text model bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging directory left


def test_files_may_be_given_as_paths_and_in_subfolders(tmp_path):
    source = tmp_path / "weights.onnx"
    source.write_bytes(b"from a path")
    m = manifest(modalities={"image": image_modality("models/image.onnx", ImagePreprocessor(image_size=32))})
    directory = write_bundle(tmp_path / "b", m, {"models/image.onnx": source})
    assert load_bundle(directory).model_bytes("image") == b"from a path"


def test_write_refuses_to_clobber_unless_asked(bundle_dir):
    with pytest.raises(FileExistsError):
        write_bundle(bundle_dir, manifest(), FILES)
    write_bundle(bundle_dir, manifest(bits=32), FILES, overwrite=True)
    assert load_bundle(bundle_dir).bits == 32
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == ["bundle"]


def test_write_validates_before_writing_anything(tmp_path):
    with pytest.raises(BundleError, match="multiple of 8"):
        write_bundle(tmp_path / "b", manifest(bits=12), FILES)
    with pytest.raises(BundleError, match="not listed"):
        write_bundle(tmp_path / "b", manifest(), {"image.onnx": b"x"})
    with pytest.raises(BundleError, match="unsafe"):
        write_bundle(tmp_path / "b", manifest(), {**FILES, "../escape": b"x"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(method=""), "method"),
        (lambda m: m.update(bits=0), "bits"),
        (lambda m: m.update(modalities={}), "at least one"),
        (lambda m: m["modalities"].update(audio={}), "unknown modalities"),
        (lambda m: m["modalities"]["image"]["input"].update(dtype="float16"), "dtype"),
        (lambda m: m["modalities"]["image"]["input"].update(shape=[1, 3, 32, 32]), "shape"),
        (lambda m: m["modalities"]["image"]["input"].update(shape=["batch", 3, 64, 64]), "preprocess makes"),
        (lambda m: m["modalities"]["image"]["preprocess"].update(resize_mode="zoom"), "preprocess is invalid"),
        (lambda m: m["modalities"]["text"]["output"].update(values="logits"), "values"),
        (lambda m: m["modalities"]["text"].pop("vocabulary_fingerprint"), "fingerprint"),
        (lambda m: m["modalities"]["text"].update(file="other.onnx"), "not listed"),
        (lambda m: m.update(label_names="animals"), "label_names"),
        (lambda m: m["files"].update({"image.onnx": "abc"}), "sha256"),
        (lambda m: m["modalities"]["image"].update(variants=[]), "variants must be an object"),
        (lambda m: m["modalities"]["image"].update(variants={"int4": {"file": "image.onnx"}}), "unknown variant"),
        (lambda m: m["modalities"]["text"].update(variants={"int8": {"file": "text.int8.onnx"}}), "not listed"),
    ],
)
def test_manifest_schema_errors_name_the_key(bundle_dir, change, message):
    data = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    change(data)
    with pytest.raises(BundleError, match=message):
        validate_manifest(data)


REFERENCE = {"contract": {"bit_floor": 0.97, "fp32_tolerance": 1e-4, "fp32_bit_floor": 0.999},
             "modalities": {"image": {"file": "reference/image.npz", "items": 2},
                            "text": {"file": "reference/text.npz", "items": 2}}}


def reference_bundle(directory, inputs_shape=(2, 3, 32, 32), outputs_shape=(2, 16)):
    from cmhash.reference import reference_file

    rng = np.random.default_rng(0)
    files = {**FILES,
             "reference/image.npz": reference_file(rng.standard_normal(inputs_shape).astype(np.float16),
                                                   rng.standard_normal(outputs_shape)),
             "reference/text.npz": reference_file(np.eye(2, VOCAB.dim, dtype=np.uint8), rng.standard_normal((2, 16)))}
    return write_bundle(directory, manifest(reference=json.loads(json.dumps(REFERENCE))), files)


def test_reference_sets_are_listed_checksummed_and_read_as_float32(tmp_path):
    from cmhash.reference import read_reference, unchecked_reason

    bundle = load_bundle(reference_bundle(tmp_path / "b"))
    assert unchecked_reason(bundle) is None
    inputs, outputs = read_reference(bundle, "text")
    assert inputs.dtype == outputs.dtype == np.float32 and inputs.shape == (2, VOCAB.dim) and inputs.sum() == 2
    (tmp_path / "b" / "reference" / "image.npz").write_bytes(b"not an npz")
    with pytest.raises(BundleChecksumError, match="reference/image.npz fails its checksum"):
        load_bundle(tmp_path / "b")
    wrong = load_bundle(reference_bundle(tmp_path / "c", inputs_shape=(2, 3, 16, 16)))
    with pytest.raises(BundleError, match=r"reference/image.npz holds inputs \(2, 3, 16, 16\)"):
        read_reference(wrong, "image")


def test_a_pickled_reference_set_is_refused(tmp_path):
    import io

    from cmhash.reference import read_reference

    directory = reference_bundle(tmp_path / "b")
    buffer = io.BytesIO()
    np.savez(buffer, inputs=np.array([{"a": 1}] * 2, dtype=object), outputs=np.zeros((2, 16), np.float32))
    loaded = load_bundle(directory)
    files = {**loaded.files, "reference/text.npz": buffer.getvalue()}
    pickled = load_bundle(write_bundle(tmp_path / "p", manifest(reference=REFERENCE), files))
    with pytest.raises(BundleError, match="not a reference set"):
        read_reference(pickled, "text")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("contract"), "contract must give"),
        (lambda r: r["contract"].update(bit_floor="high"), "contract must give"),
        (lambda r: r["modalities"].pop("text"), "must cover the bundle's modalities"),
        (lambda r: r["modalities"]["image"].update(file="reference/other.npz"), "not listed"),
        (lambda r: r["modalities"]["text"].update(items=0), "positive int"),
        (lambda r: r.update(modalities=[]), "'reference' must be an object"),
    ],
)
def test_reference_schema_errors_name_the_key(tmp_path, change, message):
    data = json.loads((reference_bundle(tmp_path / "b") / MANIFEST_NAME).read_text())
    change(data["reference"])
    with pytest.raises(BundleError, match=message):
        validate_manifest(data)


def test_unknown_major_version_is_refused_naming_the_supported_ones(bundle_dir):
    rewrite_manifest(bundle_dir, lambda m: m.update(format_version="2.0", everything="else changed"))
    with pytest.raises(BundleVersionError, match=r"format 2\.0 is not supported.*reads format 1\.x"):
        load_bundle(bundle_dir)


def test_newer_minor_version_is_read(bundle_dir):
    rewrite_manifest(bundle_dir, lambda m: m.update(format_version="1.7", new_optional_key=[1, 2]))
    assert load_bundle(bundle_dir).format_version == "1.7"


@pytest.mark.parametrize("version", [None, 1, "1", "v1.0", "1.0.0"])
def test_malformed_version(bundle_dir, version):
    rewrite_manifest(bundle_dir, lambda m: m.update(format_version=version))
    with pytest.raises(BundleVersionError, match="major.minor"):
        load_bundle(bundle_dir)


def test_tampered_file_fails_its_checksum_by_name(bundle_dir):
    (bundle_dir / "text.onnx").write_bytes(b"text model bytEs")
    with pytest.raises(BundleChecksumError, match="text.onnx fails its checksum"):
        load_bundle(bundle_dir)


def test_missing_extra_and_linked_files(bundle_dir):
    (bundle_dir / "stray.txt").write_text("left over")
    with pytest.raises(BundleError, match="not listed in the manifest: stray.txt"):
        load_bundle(bundle_dir)
    (bundle_dir / "stray.txt").unlink()
    os.symlink(bundle_dir / "image.onnx", bundle_dir / "link.onnx")
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(bundle_dir)
    (bundle_dir / "link.onnx").unlink()
    (bundle_dir / "vocab.json").unlink()
    with pytest.raises(BundleError, match="missing: vocab.json"):
        load_bundle(bundle_dir)


def test_manifest_missing_or_not_json(bundle_dir, tmp_path):
    (bundle_dir / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)
    (bundle_dir / MANIFEST_NAME).unlink()
    with pytest.raises(BundleError, match="not a cmhash bundle"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleNotFoundError):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        load_bundle(tmp_path / "nowhere")
    plain = tmp_path / "plain.txt"
    plain.write_text("hello")
    with pytest.raises(BundleError, match="neither a bundle directory nor a zip"):
        load_bundle(plain)


def test_manifest_listing_a_path_outside_the_bundle_is_refused(bundle_dir):
    rewrite_manifest(bundle_dir, lambda m: m["files"].update({"../../etc/passwd": "0" * 64}))
    with pytest.raises(BundleError, match="unsafe file name"):
        load_bundle(bundle_dir)


def test_vocabulary_swapped_with_matching_checksum_is_caught_by_fingerprint(bundle_dir):
    other = Vocabulary.from_words(["cat", "dog", "sky"]).to_json().encode()
    (bundle_dir / "vocab.json").write_bytes(other)
    rewrite_manifest(bundle_dir, lambda m: m["files"].update({"vocab.json": hashlib.sha256(other).hexdigest()}))
    bundle = load_bundle(bundle_dir)
    with pytest.raises(BundleChecksumError, match="different vocabulary"):
        bundle.vocabulary()


def test_archive_round_trip_is_deterministic(bundle_dir, tmp_path):
    archive = pack_archive(bundle_dir)
    assert archive == bundle_dir.parent / "bundle.zip"
    from_zip, from_dir = load_bundle(archive), load_bundle(bundle_dir)
    assert from_zip.manifest == from_dir.manifest and dict(from_zip.files) == dict(from_dir.files)
    again = pack_archive(bundle_dir, tmp_path / "again.zip")
    assert again.read_bytes() == archive.read_bytes()
    with zipfile.ZipFile(archive) as zf:
        assert zf.namelist() == ["manifest.json", "image.onnx", "text.onnx", "vocab.json"]


def test_pack_refuses_a_bad_bundle(bundle_dir):
    (bundle_dir / "image.onnx").write_bytes(b"changed")
    with pytest.raises(BundleChecksumError):
        pack_archive(bundle_dir)
    assert not (bundle_dir.parent / "bundle.zip").exists()


def zip_with(path, entries):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def test_archive_with_tampered_member(bundle_dir, tmp_path):
    entries = [(MANIFEST_NAME, (bundle_dir / MANIFEST_NAME).read_bytes())]
    entries += [(name, b"tampered" if name == "image.onnx" else data) for name, data in FILES.items()]
    with pytest.raises(BundleChecksumError, match="image.onnx"):
        load_bundle(zip_with(tmp_path / "t.zip", entries))


@pytest.mark.parametrize("evil", ["../evil.onnx", "/abs/evil.onnx", "a/../../evil", "C:/evil", "dir\\evil"])
def test_archive_path_traversal_is_refused(bundle_dir, tmp_path, evil):
    entries = [(MANIFEST_NAME, (bundle_dir / MANIFEST_NAME).read_bytes())] + list(FILES.items()) + [(evil, b"x")]
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name)
            info.filename = name  # keep the name exactly as an attacker would write it
            zf.writestr(info, data)
    with pytest.raises(BundleError, match="unsafe"):
        load_bundle(path)
    assert not (tmp_path.parent / "evil.onnx").exists()


def test_archive_duplicates_truncation_and_links(bundle_dir, tmp_path):
    manifest_bytes = (bundle_dir / MANIFEST_NAME).read_bytes()
    with pytest.warns(UserWarning):  # zipfile warns about the duplicate name it is told to write
        dup = zip_with(tmp_path / "dup.zip", [(MANIFEST_NAME, manifest_bytes), *FILES.items(), ("text.onnx", b"evil")])
    with pytest.raises(BundleError, match="twice"):
        load_bundle(dup)
    good = pack_archive(bundle_dir)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[: len(data) - 30])
    with pytest.raises(BundleError):
        load_bundle(truncated)
    linked = tmp_path / "link.zip"
    with zipfile.ZipFile(linked, "w") as zf:
        zf.writestr(MANIFEST_NAME, manifest_bytes)
        for name, content in FILES.items():
            info = zipfile.ZipInfo(name)
            if name == "vocab.json":
                info.external_attr = (0o120777) << 16  # a symlink entry
            zf.writestr(info, content)
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(linked)


def test_bundle_without_vocabulary_and_single_modality(tmp_path):
    m = manifest(modalities={"text": text_modality("text.onnx", 1386)})
    bundle = load_bundle(write_bundle(tmp_path / "b", m, {"text.onnx": b"t"}))
    assert bundle.modalities == ("text",) and bundle.vocabulary() is None
    with pytest.raises(BundleError, match="no image model"):
        bundle.image_preprocessor()


def test_every_bundle_error_is_a_cmhash_value_error():
    for cls in (BundleError, BundleChecksumError, BundleVersionError, BundleNotFoundError):
        assert issubclass(cls, CmhashError) and issubclass(cls, ValueError)


def test_variants_are_listed_and_picked_by_name(tmp_path):
    m = manifest()
    m["modalities"]["image"]["variants"] = {"int8": {"file": "image.int8.onnx"}, "fp16": {"file": "image.fp16.onnx"}}
    bundle = load_bundle(write_bundle(tmp_path / "b", m, {**FILES, "image.int8.onnx": b"q", "image.fp16.onnx": b"h"}))
    assert bundle.variants("image") == ("fp32", "fp16", "int8")
    assert bundle.variants("text") == ("fp32",)
    assert bundle.model_bytes("image", "int8") == b"q" and bundle.model_bytes("image") == b"image model bytes"
    with pytest.raises(BundleError, match="no fp16 text model"):
        bundle.model_file("text", "fp16")
    with pytest.raises(ValueError, match="unknown variant"):
        bundle.model_file("image", "int4")


def test_fingerprint_names_the_code_space_not_the_variants(tmp_path):
    plain = load_bundle(write_bundle(tmp_path / "a", manifest(), FILES))
    m = manifest()
    m["modalities"]["image"]["variants"] = {"int8": {"file": "image.int8.onnx"}}
    with_variant = load_bundle(write_bundle(tmp_path / "b", m, {**FILES, "image.int8.onnx": b"q"}))
    assert len(plain.fingerprint) == 64 and plain.fingerprint == with_variant.fingerprint
    retrained = load_bundle(write_bundle(tmp_path / "c", manifest(), {**FILES, "image.onnx": b"other weights"}))
    longer = load_bundle(write_bundle(tmp_path / "d", manifest(bits=32), FILES))
    assert len({plain.fingerprint, retrained.fingerprint, longer.fingerprint}) == 3
