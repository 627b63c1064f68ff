"""Hostile images: sizes are bounded before anything is allocated (a model input of
20000x20000, an endless file object), and damaged images stop a training run before it
trains (the pre-check decodes each image to its end, so a file truncated after a valid
header is caught too)."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cmhash
from cmhash import limits
from cmhash.errors import ResourceLimitError
from cmhash.preprocess import ImagePreprocessor, load_image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from fixtures.data import DATA  # noqa: E402
from fixtures.towers import image_onnx, make_bundle, random_weights  # noqa: E402


def training():
    """The training data loader and its error, or a skip without the train extra."""
    pytest.importorskip("torch", reason="the training data loader is part of the train extra")
    from cmhash.training.data import sources
    from cmhash.training.errors import MissingImagesError

    return sources.check_image_files, sources.load_manifest, MissingImagesError

PHOTOS = sorted((DATA / "mirflickr-mini" / "images").glob("*.jpg"))


def photo(i: int) -> bytes:
    """A real photo where the shared data is present, else a noisy 200x160 JPEG."""
    if PHOTOS:
        return PHOTOS[i].read_bytes()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (160, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, suffix in enumerate(["jpg", "jpg", "png", "webp"]):
        path = tmp_path / f"ok{i}.{suffix}"
        if suffix == "jpg":
            path.write_bytes(photo(i))
        else:
            Image.open(io.BytesIO(photo(i))).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("suffix", ["jpg", "png", "webp"])
def test_an_image_truncated_after_its_header_is_caught(images, tmp_path, suffix):
    check_image_files, _, MissingImagesError = training()
    good = images[{"jpg": 0, "png": 2, "webp": 3}[suffix]].read_bytes()
    bad = tmp_path / f"bad.{suffix}"
    bad.write_bytes(good[: len(good) * 6 // 10])
    if suffix != "webp":  # (Pillow's WebP reader already fails at open)
        with Image.open(bad) as im:
            assert im.size  # the header alone looks fine
    check_image_files(images)
    with pytest.raises(MissingImagesError, match="1 of 5 image files cannot be read") as info:
        check_image_files([*images, bad])
    assert [p for p, _ in info.value.unreadable] == [bad]


def test_a_training_manifest_with_a_truncated_jpeg_stops_before_training(images, tmp_path):
    _, load_manifest, MissingImagesError = training()
    good = images[0].read_bytes()
    (tmp_path / "bad.jpg").write_bytes(good[: len(good) // 2])
    rows = [{"image": p.name, "text": "a cat", "labels": ["animals"]} for p in images]
    rows.append({"image": "bad.jpg", "text": "a dog", "labels": ["animals"]})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MissingImagesError, match="bad.jpg"):
        load_manifest(manifest)
    assert len(load_manifest(manifest, check_images=False).images) == 5


# --- sizes ---------------------------------------------------------------------------------------


def test_a_huge_image_size_with_a_symbolic_model_is_refused_at_load(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    model = image_onnx(random_weights(32, 12), "side")  # height and width symbolic: any size runs
    path, _ = make_bundle(tmp_path / "b", image_size=32, image_model=model, modalities=("image",))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["modalities"]["image"]["preprocess"]["image_size"] = 20000
    manifest["modalities"]["image"]["input"]["shape"][2:] = [20000, 20000]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ResourceLimitError, match=r"image_size 20000x20000 .*\(.*4.5 GiB.*\).*MAX_IMAGE_SIDE"):
        cmhash.Encoder.load(path)
    monkeypatch.setattr(limits, "MAX_IMAGE_SIDE", 20000)
    assert cmhash.Encoder.load(path).preprocessor.output_size == (20000, 20000)


def test_a_batch_whose_pixels_exceed_the_result_limit_is_refused(monkeypatch):
    monkeypatch.setattr(limits, "MAX_RESULT_BYTES", 10 * 3 * 32 * 32 * 4)
    pre = ImagePreprocessor(image_size=32)
    image = np.zeros((40, 40, 3), np.uint8)
    assert pre([image] * 10).shape == (10, 3, 32, 32)
    with pytest.raises(ResourceLimitError, match="11 images of 32x32"):
        pre([image] * 11)


class Endless(io.RawIOBase):
    """A binary stream that never ends (like /dev/zero or a socket that keeps sending)."""

    def readable(self):
        return True

    def readinto(self, buffer):
        buffer[:] = bytes(len(buffer))
        return len(buffer)


def test_an_endless_file_object_is_bounded(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    monkeypatch.setattr(limits, "MAX_IMAGE_BYTES", 1 << 20)
    with pytest.raises(ResourceLimitError, match="MAX_IMAGE_BYTES"):
        load_image(Endless())
    encoder = cmhash.Encoder.load(make_bundle(tmp_path / "b", modalities=("image",))[0])
    with pytest.raises(ResourceLimitError, match="more than 1,048,576 bytes"):
        encoder.hash(io.BufferedReader(Endless()))
    with open(tmp_path / "ok.jpg", "wb") as fh:
        fh.write(photo(0))
    with open(tmp_path / "ok.jpg", "rb") as fh:  # a real file under the limit still works
        assert encoder.hash(fh).shape == (4,)
