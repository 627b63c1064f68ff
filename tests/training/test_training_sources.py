import json

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from cmhash.text import Vocabulary
from cmhash.training.data import (CrossModalDataset, build_transform, load_data, load_manifest,
                                  load_mat_layout, load_mirflickr25k, load_mirflickr_mini, make_split,
                                  preprocess_config)
from cmhash.training.errors import ConfigError, DataError, MissingImagesError

from conftest import require


def _image(path, colour=(200, 30, 30), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture
def manifest_dir(tmp_path):
    for k in range(4):
        _image(tmp_path / "img" / f"{k}.png", colour=(60 * k, 0, 0))
    return tmp_path


def test_jsonl_manifest_end_to_end(manifest_dir):
    path = _jsonl(manifest_dir / "data.jsonl", [
        {"image": "img/0.png", "text": "A dog on the beach", "labels": ["dog", "beach"]},
        {"image": "img/1.png", "tags": ["dog", "park"], "labels": ["dog"]},
        {"image": "img/2.png", "text": "a cat", "tags": ["sofa"], "labels": ["cat"]},
        {"image": "img/3.png", "text": "beach at night", "labels": ["beach"]},
    ])
    data = load_manifest(path)
    assert data.label_names == ["beach", "cat", "dog"]  # sorted names found
    np.testing.assert_array_equal(data.labels, [[1, 0, 1], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
    vocab = data.build_vocabulary([0, 1], min_count=2)  # only the training texts count
    assert vocab.words == ("dog",)
    data = data.with_vocabulary(data.build_vocabulary([0, 1, 2, 3]))
    dataset = CrossModalDataset(data, [2, 0], build_transform(preprocess_config(32)))
    image, text, labels, index = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert text.dtype == torch.float32 and text.shape == (len(data.vocabulary),)
    assert {data.vocabulary.words[j] for j in torch.nonzero(text).flatten().tolist()} == {"a", "cat", "sofa"}
    assert labels.tolist() == [0, 1, 0] and index == 0
    assert dataset.labels.shape == (2, 3)


def test_csv_manifest_with_label_indices_and_given_vocabulary(manifest_dir):
    (manifest_dir / "labels.txt").write_text("sky\nsea\nsand\n")
    path = manifest_dir / "data.csv"
    path.write_text("image,text,tags,labels\nimg/0.png,blue sky,sun|sea,0|1\nimg/1.png,,sand,2\n")
    vocab = Vocabulary(["sky", "sea", "sand", "sun"])
    data = load_manifest(path, label_names=manifest_dir / "labels.txt", vocabulary=vocab)
    np.testing.assert_array_equal(data.labels, [[1, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(data.text(0), [1, 1, 0, 1])
    np.testing.assert_array_equal(data.text(1), [0, 0, 1, 0])


def test_empty_manifest(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_manifest(path)


def test_labels_outside_label_set(manifest_dir):
    path = _jsonl(manifest_dir / "data.jsonl", [
        {"image": "img/0.png", "text": "x", "labels": ["dog"]},
        {"image": "img/1.png", "text": "y", "labels": ["dgo"]},
        {"image": "img/2.png", "text": "z", "labels": [7]},
    ])
    with pytest.raises(DataError) as err:
        load_manifest(path, label_names=["dog", "cat"])
    assert "2 labels outside the label set" in str(err.value)
    assert "data.jsonl:2: 'dgo'" in str(err.value) and "data.jsonl:3: '7'" in str(err.value)


def test_manifest_without_text_or_with_index_tags_and_no_vocabulary(manifest_dir):
    path = _jsonl(manifest_dir / "a.jsonl", [{"image": "img/0.png", "labels": ["dog"]}])
    with pytest.raises(DataError, match="no text modality"):
        load_manifest(path)
    path = _jsonl(manifest_dir / "b.jsonl", [{"image": "img/0.png", "tags": [3, 4], "labels": ["dog"]}])
    with pytest.raises(DataError, match="need a vocabulary"):
        load_manifest(path)


def test_missing_and_unreadable_images_before_training(manifest_dir):
    (manifest_dir / "img" / "broken.png").write_text("not an image")
    path = _jsonl(manifest_dir / "data.jsonl", [
        {"image": "img/0.png", "text": "x", "labels": ["a"]},
        {"image": "img/nothere.png", "text": "y", "labels": ["a"]},
        {"image": "img/broken.png", "text": "z", "labels": ["a"]},
    ])
    with pytest.raises(MissingImagesError) as err:
        load_manifest(path)
    assert isinstance(err.value, FileNotFoundError)
    assert err.value.missing == [manifest_dir / "img" / "nothere.png"]
    assert [p for p, _ in err.value.unreadable] == [manifest_dir / "img" / "broken.png"]
    assert "1 of 3 image files are missing" in str(err.value) and "nothere.png" in str(err.value)


def _mat_layout(tmp_path, names):
    rng = np.random.default_rng(0)
    labels = (rng.random((len(names), 3)) < 0.5).astype(np.uint8)
    tags = (rng.random((len(names), 6)) < 0.4).astype(np.uint8)
    files = {"imgList.mat": {"FAll": np.array(names, dtype=object).reshape(-1, 1)},
             "tagList.mat": {"YAll": tags}, "labelList.mat": {"LAll": labels.T}}  # labels stored column-per-sample
    for name, content in files.items():
        scipy.io.savemat(tmp_path / name, content)
    return labels, tags


def test_mat_layout_loads_and_reports_missing_images(tmp_path):
    names = [f"./mirflickr/im{k}.jpg" for k in range(1, 6)]
    labels, tags = _mat_layout(tmp_path, names)
    for k in (1, 2, 4):
        _image(tmp_path / "images" / "mirflickr" / f"im{k}.jpg")
    args = dict(image_list=tmp_path / "imgList.mat", tags=tmp_path / "tagList.mat", labels=tmp_path / "labelList.mat",
                image_root=tmp_path / "images")
    with pytest.raises(MissingImagesError) as err:
        load_mat_layout(**args)
    assert [p.name for p in err.value.missing] == ["im3.jpg", "im5.jpg"]
    assert "2 of 5 image files are missing" in str(err.value)
    for k in (3, 5):
        _image(tmp_path / "images" / "mirflickr" / f"im{k}.jpg")
    data = load_mat_layout(**args)
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(data.bow.toarray(), tags)
    assert data.vocabulary.anonymous and len(data.vocabulary) == 6
    with pytest.raises(DataError, match="no variable 'X'"):
        load_mat_layout(**args, keys={"labels": "X"})


def test_mirflickr_preset_with_real_matrices_names_every_missing_image(shared_data, tmp_path):
    arrays = require(shared_data / "mirflickr25k" / "labels_tags.npz")
    index = np.load(arrays)["index"]
    with pytest.raises(MissingImagesError) as err:
        load_mirflickr25k(arrays, image_root=tmp_path)
    assert len(err.value.missing) == 20015
    assert [p.name for p in err.value.missing] == [f"im{k}.jpg" for k in index]
    assert f"20015 of 20015 image files are missing under {tmp_path}: {tmp_path / f'im{index[0]}.jpg'}" in str(err.value)
    split = make_split(20015, "mirflickr25k")  # the preset fits the real matrices
    assert len(split.train) == 10000


def test_mirflickr_mini_through_the_manifest_loader(shared_data):
    root = require(shared_data / "mirflickr-mini")
    data = load_mirflickr_mini(root)
    arrays = np.load(root / "arrays.npz")
    assert len(data) == 530 and data.label_names == (root / "label_names.txt").read_text().split()
    np.testing.assert_array_equal(data.labels, arrays["labels"])
    np.testing.assert_array_equal(data.bow.toarray(), arrays["tags"] > 0)
    dataset = CrossModalDataset(data, range(3), build_transform(preprocess_config(224)))
    image, text, labels, _ = dataset[1]
    assert image.shape == (3, 224, 224) and text.shape == (1386,) and labels.shape == (24,)


def test_load_data_dispatch(tmp_path):
    assert len(load_data({"source": "shapes", "n": 5, "seed": 1})) == 5
    with pytest.raises(ConfigError, match="available"):
        load_data({"source": "imagenet"})
    with pytest.raises(ConfigError, match="no option"):
        load_data({"source": "shapes", "n": 5, "colour": "red"})


def test_every_bad_manifest_row_is_listed_at_once(manifest_dir):
    path = manifest_dir / "data.jsonl"
    path.write_text("\n".join([
        json.dumps({"image": "img/0.png", "text": "x", "labels": ["a"]}),
        "{not json",
        json.dumps({"image": "img/1.png", "text": 3, "labels": ["a"]}),
        json.dumps({"image": "img/2.png", "tags": "sea", "labels": ["a"]}),
        json.dumps(["a list"]),
        json.dumps({"text": "no image", "labels": ["a"]}),
    ]) + "\n")
    with pytest.raises(DataError) as err:
        load_manifest(path)
    message = str(err.value)
    assert "5 problem(s)" in message
    for expected in ("data.jsonl:2: not valid JSON", "data.jsonl:3: 'text' must be a string",
                     "data.jsonl:4: 'tags' must be a list", "data.jsonl:5: each line must be a JSON object",
                     "data.jsonl:6: no 'image' field"):
        assert expected in message


def test_training_and_cmhash_encode_read_a_manifest_row_alike(manifest_dir):
    """One reader: the records cmhash encode reads are the rows training trains on."""
    from cmhash.inputs import read_collection

    path = manifest_dir / "data.csv"
    path.write_text("image,text,tags,labels\nimg/0.png,blue sky,sun|sea,sky|sea\nimg/1.png,,sand,sand\n")
    data = load_manifest(path)
    records = read_collection(path, "image")
    assert data.images.paths == [r.image for r in records]
    assert data.texts == [([r.text] if r.text else []) + list(r.tags) for r in records]
    assert [sorted(np.array(data.label_names)[row > 0]) for row in data.labels] == [sorted(r.labels) for r in records]


def test_negative_tag_indices_are_out_of_range_not_words(manifest_dir):
    path = _jsonl(manifest_dir / "data.jsonl", [{"image": "img/0.png", "tags": [-1, 2], "labels": ["a"]}])
    with pytest.raises(DataError, match="tag index outside the vocabulary"):
        load_manifest(path, vocabulary=Vocabulary.anonymous_of_size(4))


def test_images_are_decoded_by_the_runtime(manifest_dir):
    """An EXIF-rotated photo is upright in training, as in the SDK."""
    from cmhash.preprocess import load_image

    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[:10, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(manifest_dir / "img" / "rotated.jpg", quality=95, exif=exif.tobytes())
    path = _jsonl(manifest_dir / "data.jsonl", [{"image": "img/rotated.jpg", "text": "x", "labels": ["a"]}])
    image = load_manifest(path).images.load(0)
    assert image.mode == "RGB" and image.size == (30, 40)
    assert np.array_equal(np.asarray(image), np.asarray(load_image(manifest_dir / "img" / "rotated.jpg")))


def test_preprocessing_is_validated_once_by_the_runtime():
    from cmhash.preprocess import ImagePreprocessor

    for bad in (dict(image_size=0), dict(image_size=32, interpolation="lanczos"),
                dict(image_size=32, resize_mode="crop"), dict(image_size=32, mean=(0.5, 0.5))):
        with pytest.raises(ConfigError, match="image preprocessing"):
            preprocess_config(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        build_transform({**preprocess_config(32), "antialias": True})
    p = preprocess_config(32, interpolation="bilinear", resize_mode="squash")
    assert ImagePreprocessor.from_dict(p).to_dict() == p


def test_evaluation_transform_is_the_runtimes_bit_for_bit():
    from cmhash.preprocess import ImagePreprocessor

    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (45, 70, 3), np.uint8))
    for p in (preprocess_config(32), preprocess_config(24, interpolation="bilinear", resize_mode="squash")):
        out = build_transform(p)(image)
        assert out.dtype == torch.float32
        assert np.array_equal(out.numpy(), ImagePreprocessor.from_dict(p).transform(image))
