"""Training and the SDK see the same pixels: awkward image files (EXIF-rotated, transparent,
16-bit, palette, CMYK, progressive, animated) go through the training pipeline (a manifest
source, the dataset and its evaluation transform, as the trainer builds them) and through
``Encoder`` on a real bundle, and must give identical pixel tensors and identical codes."""

import io
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("onnx", reason="the bundle's towers are built with the onnx package")
pytest.importorskip("onnxruntime")

from cmhash.encoder import Encoder  # noqa: E402
from cmhash.errors import ImageDecodeError  # noqa: E402
from cmhash.training.data import CrossModalDataset, build_transform, load_data, preprocess_config  # noqa: E402
from fixtures.towers import make_bundle  # noqa: E402

SIZE = 32
BITS = 64
WIDTH, HEIGHT = 56, 40  # not square, so that every EXIF rotation changes the picture's shape


def scene(width=WIDTH, height=HEIGHT) -> np.ndarray:
    """An RGB picture with no symmetry: a gradient and a bright block in the top-left corner."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + 2 * y) % 256], axis=-1).astype(np.uint8)
    pixels[: height // 4, : width // 4] = (250, 240, 30)
    return pixels


def deep_grey() -> np.ndarray:
    """16-bit grey spanning 0..64_860: clipping it to 8 bits would leave it almost white."""
    return (np.mgrid[0:HEIGHT, 0:WIDTH].sum(axis=0) * 690).astype(np.uint16)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def alpha_ramp(width=WIDTH, height=HEIGHT) -> Image.Image:
    """Fully transparent left third, then a ramp to opaque."""
    ramp = np.clip((np.arange(width) - width // 3) * 255 // max(1, width - width // 3 - 1), 0, 255)
    return Image.fromarray(np.tile(ramp.astype(np.uint8), (height, 1)))


def crafted_images() -> dict[str, bytes]:
    rgb = Image.fromarray(scene())
    files = {}
    for orientation in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        files[f"exif-{orientation}.jpg"] = encoded(rgb, "JPEG", quality=95, exif=exif.tobytes())

    hidden = np.array(scene())
    hidden[:, : WIDTH // 3] = (255, 0, 255)  # a loud colour no viewer shows: it sits under alpha 0
    rgba = Image.fromarray(hidden)
    rgba.putalpha(alpha_ramp())
    files["rgba-hidden-colour.png"] = encoded(rgba, "PNG")

    la = Image.fromarray(hidden[..., 1])
    la.putalpha(alpha_ramp())
    files["la.png"] = encoded(la, "PNG")

    palette = rgb.quantize(colors=16)
    palette.putpalette([255, 0, 255] + palette.getpalette()[3:])  # colour 0: magenta, made transparent
    files["palette-transparent.png"] = encoded(palette, "PNG", transparency=0)

    files["grey-16bit.png"] = encoded(Image.fromarray(deep_grey()), "PNG")

    files["cmyk.jpg"] = encoded(rgb.convert("CMYK"), "JPEG", quality=95)
    files["progressive.jpg"] = encoded(rgb, "JPEG", quality=90, progressive=True)
    # large enough for reduced decoding (1/4 scale: both sides stay >= SIZE), upright and rotated
    large = Image.fromarray(scene(WIDTH * 5, HEIGHT * 5))
    files["large.jpg"] = encoded(large, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    files["large-exif-6.jpg"] = encoded(large, "JPEG", quality=90, exif=exif.tobytes())

    frames = [Image.fromarray(scene()), Image.fromarray(255 - scene()), Image.fromarray(scene()[::-1])]
    files["animated.gif"] = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return files


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """The crafted files and a training manifest naming them."""
    folder = tmp_path_factory.mktemp("crafted")
    names = sorted(crafted_images())
    for name, data in crafted_images().items():
        (folder / name).write_bytes(data)
    with open(folder / "manifest.jsonl", "w") as fh:
        for name in names:
            fh.write(json.dumps({"image": name, "text": "cat", "labels": ["animals"]}) + "\n")
    return folder, names


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    directory, _ = make_bundle(tmp_path_factory.mktemp("bundle") / "bundle", bits=BITS, image_size=SIZE)
    with Encoder.load(directory, threads=1) as enc:
        yield enc


def test_the_crafted_files_are_what_they_claim(collection):
    folder, names = collection
    modes = {name: Image.open(folder / name).mode for name in names}
    assert modes["rgba-hidden-colour.png"] == "RGBA" and modes["la.png"] == "LA"
    assert modes["palette-transparent.png"] == "P" and "transparency" in Image.open(folder / "palette-transparent.png").info
    assert modes["grey-16bit.png"].startswith("I")
    assert modes["cmyk.jpg"] == "CMYK"
    assert Image.open(folder / "progressive.jpg").info.get("progressive")
    assert Image.open(folder / "animated.gif").n_frames == 3
    assert all(Image.open(folder / f"exif-{k}.jpg").getexif()[0x0112] == k for k in range(2, 9))
    assert Image.open(folder / "large.jpg").size == (WIDTH * 5, HEIGHT * 5)


def test_training_and_encoder_see_identical_pixels_and_give_identical_codes(collection, encoder):
    folder, names = collection
    preprocess = preprocess_config(SIZE)  # what a method records for its image tower
    assert encoder.bundle.image_preprocessor().to_dict() == preprocess

    data = load_data({"source": "manifest", "path": folder / "manifest.jsonl"})
    data = data.with_vocabulary(data.build_vocabulary(range(len(data))))
    dataset = CrossModalDataset(data, range(len(data)), build_transform(preprocess))  # the query/database sets
    training = np.stack([dataset[k][0].numpy() for k in range(len(dataset))])

    files = [folder / name for name in names]
    sdk = encoder.preprocessor(files)
    assert training.dtype == sdk.dtype == np.float32 and training.shape == sdk.shape == (len(names), 3, SIZE, SIZE)
    differing = [name for name, a, b in zip(names, training, sdk) if not np.array_equal(a, b)]
    assert not differing, f"training and the SDK decode these files differently: {differing}"

    codes = encoder.hash_images(files, batch_size=5)
    from_training_pixels = encoder.hash_preprocessed("image", training)
    differing = [name for name, a, b in zip(names, codes, from_training_pixels) if not np.array_equal(a, b)]
    assert not differing, f"codes differ between training's pixels and the SDK's for {differing}"


def test_training_evaluation_pixels_equal_open_clips_transform(collection):
    """Training's evaluation transform is the runtime's; on the decoded crafted images it is
    also open_clip's own evaluation transform, bit for bit (what training used before)."""
    open_clip = pytest.importorskip("open_clip")
    folder, _ = collection
    data = load_data({"source": "manifest", "path": folder / "manifest.jsonl"})
    ours, reference = build_transform(preprocess_config(SIZE)), open_clip.image_transform(SIZE, is_train=False)
    for i in range(len(data)):
        image = data.images.load(i)
        assert np.array_equal(ours(image).numpy(), reference(image).numpy()), data.images.paths[i].name


# What a viewer shows for each EXIF orientation, from the pixels as stored (numpy only).
UPRIGHT = {
    2: np.fliplr,
    3: lambda a: a[::-1, ::-1],
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def test_the_decoding_rules_hold_on_the_training_side(collection):
    """Beyond agreeing, the shared decoder does what a viewer does."""
    folder, _ = collection
    data = load_data({"source": "manifest", "path": folder / "manifest.jsonl"})
    position = {p.name: i for i, p in enumerate(data.images.paths)}
    load = lambda name: np.asarray(data.images.load(position[name]))  # noqa: E731
    for k, upright in UPRIGHT.items():
        stored = np.asarray(Image.open(folder / f"exif-{k}.jpg").convert("RGB"))
        assert np.array_equal(load(f"exif-{k}.jpg"), upright(stored)), f"EXIF orientation {k} not applied"
    for name in ("rgba-hidden-colour.png", "la.png"):
        assert (load(name)[:, : WIDTH // 3] == 255).all(), f"{name}: the colour under transparent pixels leaked through"
    assert not np.all(load("palette-transparent.png") == (255, 0, 255), axis=-1).any(), \
        "the palette's transparent colour leaked through"
    grey = load("grey-16bit.png")[..., 0]
    assert np.array_equal(grey, (deep_grey().astype(int) * 255 + 32767) // 65535), "16-bit grey was clipped, not scaled"
    first = np.abs(load("animated.gif").astype(int) - scene()).mean()
    second = np.abs(load("animated.gif").astype(int) - (255 - scene())).mean()
    assert first < 10 < second, "an animated GIF gives its first frame"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_file_stops_training_with_the_typed_error(tmp_path, damage):
    good = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), "JPEG")
    data = {"truncated": good[: len(good) // 2], "garbage": good[:20] + bytes(range(256)) * 8, "empty": b""}[damage]
    (tmp_path / "bad.jpg").write_bytes(data)
    (tmp_path / "good.jpg").write_bytes(good)
    rows = [{"image": "good.jpg", "text": "cat", "labels": ["animals"]},
            {"image": "bad.jpg", "text": "dog", "labels": ["animals"]}]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_data({"source": "manifest", "path": tmp_path / "manifest.jsonl", "check_images": False})
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        data.images.load(1)
