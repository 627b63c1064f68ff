"""Image decoding and preprocessing: the runtime's Pillow + numpy path against open_clip's
evaluation transform (bit for bit), odd image modes, every kind of source, bad input."""

import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cmhash.errors import (
    CmhashError,
    ImageDecodeError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidArgumentError,
    UnsupportedInputError,
)
from cmhash.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    ImagePreprocessor,
    load_image,
    preprocessor_from_open_clip,
)

from fixtures.data import DATA, missing  # noqa: E402

PHOTOS = sorted((DATA / "mirflickr-mini" / "images").glob("*.jpg"))


def open_clip_transform(**kwargs):
    open_clip = pytest.importorskip("open_clip")
    return open_clip.image_transform(is_train=False, **kwargs)


def max_diff(open_clip_tf, ours: ImagePreprocessor, image: Image.Image) -> float:
    expected = open_clip_tf(image).numpy()
    got = ours.transform(image)
    assert got.dtype == np.float32 and got.shape == expected.shape
    return float(np.abs(expected - got).max())


# --- parity with open_clip ------------------------------------------------------------------


@pytest.mark.skipif(not PHOTOS, reason=missing(DATA / "mirflickr-mini"))
@pytest.mark.parametrize("size", [224, 64])
def test_real_photos_match_open_clip_bit_for_bit(size):
    reference = open_clip_transform(image_size=size)  # the training transform's arguments
    ours = ImagePreprocessor(image_size=size)
    assert len(PHOTOS) >= 500
    sizes = set()
    worst = 0.0
    for path in PHOTOS:
        image = load_image(path)
        sizes.add(image.size)
        worst = max(worst, max_diff(reference, ours, image))
    assert len(sizes) > 20, "the photos should cover many sizes and aspect ratios"
    assert worst == 0.0


@pytest.mark.skipif(not PHOTOS, reason=missing(DATA / "mirflickr-mini"))
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(image_size=64, resize_mode="squash", interpolation="bilinear"),
        dict(image_size=64, resize_mode="longest", fill_color=7),
        dict(image_size=(48, 80), resize_mode="shortest"),
        dict(image_size=96, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear"),
    ],
)
def test_other_open_clip_settings_match(kwargs):
    reference = open_clip_transform(**kwargs)
    ours = preprocessor_from_open_clip(**kwargs)
    worst = max(max_diff(reference, ours, load_image(path)) for path in PHOTOS[::10])
    assert worst == 0.0


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    size=st.sampled_from([16, 31, 64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_size_and_aspect_ratio_matches_open_clip(height, width, size, seed):
    reference = open_clip_transform(image_size=size)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = load_image(pixels)
    assert max_diff(reference, ImagePreprocessor(image_size=size), image) == 0.0


# --- odd modes: the decoding rule, then parity on its output ---------------------------------


def encode(image: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def gradient(width=40, height=30) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 6 % 256, y * 8 % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)


def odd_mode_images() -> dict[str, bytes]:
    rgb = Image.fromarray(gradient())
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 40).astype(np.uint8), (30, 1)))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    grey = rgb.convert("L")
    la = grey.copy()
    la.putalpha(alpha)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 3
    deep = Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 54).astype(np.uint16))
    return {
        "P.png": encode(palette, "PNG"),
        "P-transparent.png": encode(transparent_palette, "PNG", transparency=3),
        "P.gif": encode(palette, "GIF"),
        "L.png": encode(grey, "PNG"),
        "LA.png": encode(la, "PNG"),
        "RGBA.png": encode(rgba, "PNG"),
        "CMYK.jpg": encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "CMYK.tiff": encode(rgb.convert("CMYK"), "TIFF"),
        "I16.png": encode(deep, "PNG"),
        "1.png": encode(rgb.convert("1"), "PNG"),
        "exif-rotated.jpg": exif_rotated_jpeg(),
        "RGB.webp": encode(rgb, "WEBP", lossless=True),
    }


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 40x30 JPEG with a bright top-left block and an EXIF Orientation tag."""
    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[:10, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("name", sorted(odd_mode_images()))
def test_odd_modes_decode_to_rgb_and_match_open_clip(name):
    data = odd_mode_images()[name]
    image = load_image(data)
    assert image.mode == "RGB"
    reference = open_clip_transform(image_size=24)
    assert max_diff(reference, ImagePreprocessor(image_size=24), image) == 0.0


def test_exif_orientation_is_applied_first():
    image = load_image(exif_rotated_jpeg(orientation=6))  # 6: rotate 90 degrees clockwise to view
    assert image.size == (30, 40)
    pixels = np.asarray(image)
    assert pixels[:10, -10:].mean() > 200  # the bright corner moved from top-left to top-right
    assert pixels[:10, :10].mean() < 50


def test_alpha_is_composited_on_white():
    pixels = np.zeros((2, 3, 4), np.uint8)
    pixels[..., 0] = 200  # red channel under the alpha
    pixels[0, :, 3] = [0, 128, 255]
    pixels[1, :, 3] = 255
    image = np.asarray(load_image(pixels))
    assert image[0, 0].tolist() == [255, 255, 255]  # fully transparent: white, not the hidden red
    assert image[0, 2].tolist() == [200, 0, 0]  # opaque: the colour itself
    assert 200 < image[0, 1, 0] < 255 and 120 < image[0, 1, 1] < 135  # half: a blend with white
    la = Image.fromarray(np.array([[[10, 0], [10, 255]]], np.uint8), mode="LA")
    assert np.asarray(load_image(la)).tolist() == [[[255] * 3, [10] * 3]]


def test_palette_transparency_is_composited_on_white():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(load_image(palette)).tolist() == [[[255, 255, 255], [250, 10, 10]]]


def test_sixteen_bit_grey_is_scaled_to_eight_bits():
    values = np.array([[0, 257, 32896, 65535, 128]], np.uint16)
    image = load_image(encode(Image.fromarray(values), "PNG"))
    assert np.asarray(image)[..., 0].tolist() == [[0, 1, 128, 255, 0]]
    assert np.asarray(image).std(axis=-1).max() == 0  # grey stays grey


def test_cmyk_and_grey_become_plain_rgb():
    assert np.asarray(load_image(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))).tolist()[0][0] == [255, 0, 0]
    assert np.asarray(load_image(Image.new("L", (2, 2), 77))).tolist()[0][0] == [77, 77, 77]
    assert np.asarray(load_image(Image.new("1", (2, 2), 1))).tolist()[0][0] == [255, 255, 255]


def test_float_images_are_refused():
    with pytest.raises(ImageDecodeError, match="floating-point"):
        load_image(Image.new("F", (4, 4), 0.5))


# --- sources -------------------------------------------------------------------------------


def test_every_source_type_decodes_the_same(tmp_path):
    data = encode(Image.fromarray(gradient()), "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    expected = np.asarray(load_image(path))
    with open(path, "rb") as fh:
        from_file = load_image(fh)
    sources = [str(path), data, bytearray(data), memoryview(data), io.BytesIO(data), from_file, Image.open(path), gradient()]
    for source in sources:
        assert np.array_equal(np.asarray(load_image(source)), expected), type(source)


def test_grey_arrays_in_every_layout():
    grey = gradient()[..., 0]
    expected = np.repeat(grey[..., None], 3, axis=-1)
    assert np.array_equal(np.asarray(load_image(grey)), expected)
    assert np.array_equal(np.asarray(load_image(grey[..., None])), expected)


def test_load_image_does_not_hand_back_the_callers_image():
    original = Image.new("RGB", (3, 3), (1, 2, 3))
    loaded = load_image(original)
    loaded.putpixel((0, 0), (9, 9, 9))
    assert original.getpixel((0, 0)) == (1, 2, 3)


# --- bad input -----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ImageNotFoundError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(FileNotFoundError):  # the builtin a caller would catch
        load_image(str(tmp_path / "nope.jpg"))


def test_zero_bytes_everywhere(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for source in (empty, b"", io.BytesIO(b"")):
        with pytest.raises(ImageDecodeError, match="0 bytes"):
            load_image(source)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageDecodeError, match="not a file"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images(fmt):
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), fmt)
    with pytest.raises(ImageDecodeError, match="truncated|cannot be decoded"):
        load_image(data[: len(data) // 2])


def test_corrupt_and_non_image_bytes():
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image(b"hello, this is a text file\n" * 10)
    png = encode(Image.fromarray(gradient()), "PNG")
    corrupt = png[:60] + bytes(range(256)) * 4 + png[60 + 1024 :]
    with pytest.raises(ImageDecodeError):
        load_image(corrupt)
    with pytest.raises(ValueError):  # the builtin a caller would catch
        load_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)


def test_decompression_bomb_refused_before_decoding():
    bomb = encode(Image.new("1", (12_000, 12_000)), "PNG")  # 144 M pixels in a few KiB
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        load_image(bomb)
    with pytest.raises(ImageTooLargeError, match="over the limit of 100"):
        load_image(Image.new("RGB", (20, 20)), max_pixels=100)
    with pytest.raises(ImageTooLargeError):
        load_image(np.zeros((20, 20, 3), np.uint8), max_pixels=100)


def test_pillows_own_hard_limit_becomes_a_typed_error_not_a_warning():
    huge = encode(Image.new("1", (15_000, 15_000)), "PNG")  # over twice Pillow's MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLargeError):
            load_image(huge, max_pixels=None)


def test_wrong_source_types():
    for source in (None, 3.5, {"a": 1}, ["x.jpg"]):
        with pytest.raises(UnsupportedInputError):
            load_image(source)
    with pytest.raises(TypeError):
        load_image(io.StringIO("text mode"))
    with pytest.raises(UnsupportedInputError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(UnsupportedInputError, match="HWC"):
        load_image(np.zeros((3, 4, 4), np.uint8)[None])
    with pytest.raises(UnsupportedInputError, match="HWC"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageDecodeError, match="no pixels"):
        load_image(np.zeros((0, 4, 3), np.uint8))


def test_every_error_is_a_cmhash_error():
    for cls in (ImageDecodeError, ImageNotFoundError, ImageTooLargeError, UnsupportedInputError):
        assert issubclass(cls, CmhashError)


# --- the preprocessor as a config and a batch function -------------------------------------


def test_config_round_trips_through_json():
    pre = ImagePreprocessor(image_size=(48, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 0.5), resize_mode="longest")
    data = json.loads(json.dumps(pre.to_dict()))
    assert ImagePreprocessor.from_dict(data) == pre
    assert ImagePreprocessor().to_dict() == {
        "image_size": 224,
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }


def test_bad_configs_are_refused():
    for kwargs in (
        dict(image_size=0),
        dict(image_size=(1, 2, 3)),
        dict(mean=(0.5, 0.5)),
        dict(std=(0.5, 0.0, 0.5)),
        dict(interpolation="lanczos"),
        dict(resize_mode="crop"),
    ):
        with pytest.raises(ValueError):
            ImagePreprocessor(**kwargs)
    with pytest.raises(ValueError, match="unknown"):
        ImagePreprocessor.from_dict({"image_size": 32, "antialias": True})


def test_call_batches_any_sources():
    pre = ImagePreprocessor(image_size=16)
    one = pre(gradient())
    assert one.shape == (1, 3, 16, 16) and one.dtype == np.float32
    batch = pre([gradient(), encode(Image.fromarray(gradient()), "PNG"), Image.fromarray(gradient())])
    assert batch.shape == (3, 3, 16, 16)
    assert np.array_equal(batch[0], one[0]) and np.array_equal(batch[1], one[0])
    stacked = pre(np.stack([gradient(), gradient()[::-1]]))
    assert stacked.shape == (2, 3, 16, 16) and not np.array_equal(stacked[0], stacked[1])
    assert pre([]).shape == (0, 3, 16, 16)


# --- the same parity without torch: digests of open_clip's outputs, kept in fixtures ---------

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "open_clip_golden.json"


def digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.float32).tobytes()).hexdigest()[:16]


def regenerate_golden() -> None:
    """Rewrite the digests from open_clip (needs torch + open_clip_torch and the photos):
    python -c "import sys; sys.path.insert(0, 'tests'); import test_preprocess as t; t.regenerate_golden()"
    """
    import PIL
    import open_clip

    sizes = {}
    for size in (64, 224):
        transform = open_clip.image_transform(size, is_train=False)
        # decoded as ImagePreprocessor.decode does: reduced JPEG decoding down to the output side
        sizes[str(size)] = {p.name: digest(transform(load_image(p, min_side=size)).numpy()) for p in PHOTOS}
    data = {
        "about": "sha256 (first 16 hex) of open_clip.image_transform(size, is_train=False)(load_image(photo, "
        "min_side=size)) as "
        "float32 C-order bytes, for the mirflickr-mini photos; made by tests/test_preprocess.py::regenerate_golden",
        "pillow": PIL.__version__,
        "open_clip": open_clip.__version__,
        "sizes": sizes,
    }
    GOLDEN.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")


@pytest.mark.skipif(not PHOTOS, reason=missing(DATA / "mirflickr-mini"))
@pytest.mark.parametrize("size", ["64", "224"])
def test_real_photos_match_recorded_open_clip_outputs(size):
    import PIL

    golden = json.loads(GOLDEN.read_text())
    if golden["pillow"].split(".")[0] != PIL.__version__.split(".")[0]:
        pytest.skip(f"digests were made with Pillow {golden['pillow']}; JPEG decoding may differ in {PIL.__version__}")
    expected = golden["sizes"][size]
    assert sorted(expected) == sorted(p.name for p in PHOTOS)
    ours = ImagePreprocessor(image_size=int(size))
    different = [p.name for p in PHOTOS if digest(ours(p)[0]) != expected[p.name]]
    assert not different, f"{len(different)} photos differ from open_clip's recorded output, e.g. {different[:5]}"


def test_jpeg_decoding_is_reduced_down_to_min_side_never_below(tmp_path):
    """min_side: the largest DCT reduction (1/2, 1/4, 1/8) that keeps both sides at least
    min_side; the preprocessor decodes with its output side; other formats are untouched."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (1000, 1500, 3), dtype=np.uint8)
    jpeg, png = tmp_path / "photo.jpg", tmp_path / "photo.png"
    Image.fromarray(pixels).save(jpeg, quality=90)
    Image.fromarray(pixels[:100, :150]).save(png)
    assert load_image(jpeg).size == (1500, 1000)
    expected = {100: (188, 125), 125: (188, 125), 126: (375, 250), 224: (375, 250), 400: (750, 500),
                600: (1500, 1000), 5000: (1500, 1000)}
    for min_side, size in expected.items():
        image = load_image(jpeg, min_side=min_side)
        assert image.size == size and image.mode == "RGB", min_side
        assert min(image.size) >= min(min_side, 1000)
    assert ImagePreprocessor(image_size=224).decode(jpeg).size == (375, 250)
    assert ImagePreprocessor(image_size=(224, 448)).decode(jpeg).size == (750, 500)  # the longer output side
    assert load_image(jpeg.read_bytes(), min_side=224).size == (375, 250)
    assert load_image(png, min_side=10).size == (150, 100)
    for bad in (0, -3, 2.5, True, "224"):
        with pytest.raises(InvalidArgumentError, match="min_side"):
            load_image(jpeg, min_side=bad)
