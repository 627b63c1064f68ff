"""Damaged images stop a training run before it trains: the pre-check decodes each image to
its end, so a file truncated after a valid header is caught too."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch", reason="the training data loader is part of the train extra")
from cmhash.training.data.sources import check_image_files, load_manifest  # noqa: E402
from cmhash.training.errors import MissingImagesError  # noqa: E402

PHOTOS = sorted((Path(__file__).resolve().parents[3] / "shared" / "data" / "mirflickr-mini" / "images").glob("*.jpg"))


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
    good = images[0].read_bytes()
    (tmp_path / "bad.jpg").write_bytes(good[: len(good) // 2])
    rows = [{"image": p.name, "text": "a cat", "labels": ["animals"]} for p in images]
    rows.append({"image": "bad.jpg", "text": "a dog", "labels": ["animals"]})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MissingImagesError, match="bad.jpg"):
        load_manifest(manifest)
    assert len(load_manifest(manifest, check_images=False).images) == 5
