"""Image loading and preprocessing: the one path from an image to model input, shared by
training and the runtime.

Training and inference must see the same pixels, so every path that turns an image into
model input (training's data sources and evaluation transform, ``Encoder``, ``cmhash
encode``, the export's verification) decodes with :func:`load_image` and transforms with
:class:`ImagePreprocessor` (:meth:`ImagePreprocessor.pixels` does both). The transform
reproduces open_clip's evaluation transform (``open_clip.image_transform(size,
is_train=False, ...)``) with Pillow and numpy only: resize (Pillow, the same call
torchvision makes on a PIL image), centre crop (torchvision's rounding), ``/ 255`` and
``(x - mean) / std`` in float32. On RGB input the two agree bit for bit
(tests/test_preprocess.py measures it on real photos); training's random augmentation is
open_clip's own, applied to the same decoded image.

How :func:`load_image` turns any image into RGB:

1. EXIF orientation is applied first (``ImageOps.exif_transpose``); an unreadable EXIF block
   leaves the image as stored.
2. Modes with alpha (RGBA, LA, PA, and palette images with a transparent colour) are
   composited onto opaque white, the way a viewer shows them; the colour hidden under
   transparent pixels never leaks in.
3. Palette, 1-bit and grey images are expanded to RGB; CMYK goes through Pillow's own
   conversion (no ICC profile is applied).
4. 16-bit (and 32-bit integer) grey images are scaled to 8 bits, ``round(v * 255 / 65535)``
   with values clipped to 0..65535, then expanded to RGB. Floating-point images raise
   :class:`ImageDecodeError`: they carry no agreed range.
5. Multi-frame files (GIF, TIFF) give their first frame.

With ``min_side`` (which :meth:`ImagePreprocessor.decode` sets to its output side), a JPEG is
decoded at 1/2, 1/4 or 1/8 scale inside the decoder (libjpeg's DCT scaling), the smallest
scale that keeps both sides at least ``min_side`` pixels: a camera photo decodes several
times faster and the resize that follows never enlarges. Training decodes with the same
``min_side``, so both sides still see identical pixels.

Decoding is guarded: missing files, zero bytes, truncated or corrupt data, non-images and
images over ``max_pixels`` raise typed errors (see :mod:`cmhash.errors`) instead of
warnings or half-decoded pixels.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from . import limits
from .errors import (
    ImageDecodeError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidArgumentError,
    ResourceLimitError,
    UnsupportedInputError,
)

# Normalisation statistics: CLIP's (open_clip's OPENAI_DATASET_MEAN / _STD) and ImageNet's
# (torchvision's pretrained models). Training imports these; they are defined only here.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pillow's own warning threshold (about 0.25 GiB of RGB pixels); a photo is far below it.
DEFAULT_MAX_PIXELS = 89_478_485

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_INT_GREY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_WHITE = (255, 255, 255, 255)


def load_image(source: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode an image into an RGB PIL image, the same way for training and inference.

    Args:
        source: a path (``str`` or ``os.PathLike``), encoded bytes (``bytes``, ``bytearray``,
            ``memoryview``), a binary file object, a PIL image, or a uint8 numpy array of
            shape (H, W) grey, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA.
        max_pixels: refuse images with more pixels than this (width * height) before
            decoding them; ``None`` keeps only Pillow's own hard limit.
        min_side: decode JPEG files at a reduced scale (1/2, 1/4 or 1/8) where both sides
            stay at least this many pixels; ``None`` decodes at full size. Other formats and
            already decoded sources are unaffected.

    Returns:
        A fully loaded ``PIL.Image.Image`` in mode ``"RGB"``, detached from any file.

    Raises:
        ImageNotFoundError: the path does not exist.
        ImageTooLargeError: more than ``max_pixels`` pixels.
        ImageDecodeError: zero bytes, truncated, corrupt, not an image, unsupported mode.
        UnsupportedInputError: ``source`` is none of the types above.
    """
    if min_side is not None and (not isinstance(min_side, int) or isinstance(min_side, bool) or min_side < 1):
        raise InvalidArgumentError(f"min_side must be a positive int or None, got {min_side!r}")
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, "the PIL image")
        return _decoded(source, "the PIL image")
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageNotFoundError(f"image file not found: {path}")
        if not path.is_file():
            raise ImageDecodeError(f"{path} is not a file")
        if path.stat().st_size == 0:
            raise ImageDecodeError(f"{path} is empty (0 bytes); the file was not written completely")
        with open(path, "rb") as fh:
            return _decode_stream(fh, max_pixels, str(path), min_side)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError("the image bytes are empty (0 bytes)")
        return _decode_stream(io.BytesIO(bytes(source)), max_pixels, "the image bytes", min_side)
    if hasattr(source, "read"):
        data = source.read(limits.MAX_IMAGE_BYTES + 1)  # a stream may never end
        if isinstance(data, (bytes, bytearray)) and len(data) > limits.MAX_IMAGE_BYTES:
            raise ResourceLimitError(
                f"{getattr(source, 'name', 'the image file object')} gave more than {limits.MAX_IMAGE_BYTES:,} bytes; "
                "pass a path, or raise cmhash.limits.MAX_IMAGE_BYTES (env CMHASH_MAX_IMAGE_BYTES) for larger files"
            )
        if not isinstance(data, (bytes, bytearray)):
            raise UnsupportedInputError(
                "image file objects must be opened in binary mode ('rb'), got one that returns "
                f"{type(data).__name__}"
            )
        name = getattr(source, "name", "the image file object")
        if len(data) == 0:
            raise ImageDecodeError(f"{name} gave 0 bytes; is it empty or already read to the end?")
        return _decode_stream(io.BytesIO(data), max_pixels, str(name), min_side)
    raise UnsupportedInputError(
        f"cannot read an image from {type(source).__name__}; pass a path, bytes, a binary file "
        "object, a PIL image or a uint8 numpy array (H, W[, C])"
    )


def _check_pixels(size: tuple[int, int], max_pixels: int | None, what: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{what} has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}; "
            "downscale it first or raise max_pixels if the source is trusted"
        )


def _decode_stream(stream: io.IOBase, max_pixels: int | None, what: str, min_side: int | None) -> Image.Image:
    try:
        # Image.open reads the header only; Pillow's own bomb warning is replaced by our limit.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{what}: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{what} is not an image in a format Pillow can read") from exc
    except Exception as exc:  # Pillow's plugins raise many types on corrupt headers
        raise ImageDecodeError(f"{what} cannot be decoded: {exc}") from exc
    with image:
        _check_pixels(image.size, max_pixels, what)
        if min_side is not None and image.format == "JPEG":
            # Pillow picks the largest reduction s in (8, 4, 2, 1) with s <= side // min_side
            # for both sides, so the result is never smaller than min_side; same mode.
            image.draft(image.mode, (min_side, min_side))
        return _decoded(image, what)


def _decoded(image: Image.Image, what: str) -> Image.Image:
    """Load all pixels (so truncation shows now, not later), orient and convert to RGB."""
    try:
        image.load()
    except Exception as exc:
        message = str(exc)
        if "truncated" in message:
            raise ImageDecodeError(f"{what} is truncated ({message}); the file is incomplete") from exc
        raise ImageDecodeError(f"{what} cannot be decoded: {message}") from exc
    image = _exif_transposed(image)
    return _to_rgb(image, what)


def _exif_transposed(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # A malformed EXIF block is common in real photos; the pixels are still good.
        return image


def _to_rgb(image: Image.Image, what: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image.copy()  # never hand back the caller's object
    if mode == "P" and "transparency" in image.info:
        mode = "PA"
        image = image.convert("RGBA")
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _INT_GREY_MODES:
        values = np.asarray(image).astype(np.int64)
        values = np.clip(values, 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        raise ImageDecodeError(
            f"{what} has floating-point pixels (mode F), which have no agreed range; convert it to 8-bit first"
        )
    try:
        return image.convert("RGB")
    except Exception as exc:
        raise ImageDecodeError(f"{what} has pixel mode {mode!r}, which cannot be converted to RGB") from exc


def _from_array(array: np.ndarray, max_pixels: int | None) -> Image.Image:
    if array.dtype != np.uint8:
        raise UnsupportedInputError(
            f"image arrays must be uint8 (H, W[, C]) with values 0..255, got dtype {array.dtype}; "
            "16-bit or float pixels need an explicit conversion, which only you know"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        mode = "L"
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        mode = "RGB" if array.shape[2] == 3 else "RGBA"
    else:
        raise UnsupportedInputError(
            f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {array.shape}; "
            "channels go last (HWC)"
        )
    _check_pixels((array.shape[1], array.shape[0]), max_pixels, "the image array")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array), mode=mode), "the image array")


@dataclass(frozen=True)
class ImagePreprocessor:
    """open_clip's evaluation transform in Pillow + numpy, as a plain, serialisable config.

    ``ImagePreprocessor(**cfg)(images)`` equals ``open_clip.image_transform(is_train=False,
    **cfg)`` applied to ``load_image(image)`` and stacked.

    Fields:
        image_size: output side (int, square) or (height, width).
        mean, std: per-channel normalisation, applied after scaling to [0, 1].
        interpolation: ``"bicubic"`` or ``"bilinear"`` (Pillow's filters, antialiased).
        resize_mode: ``"shortest"`` (shortest side to size, centre crop), ``"longest"``
            (longest side to size, pad with ``fill_color``, centre crop) or ``"squash"``
            (resize to size, aspect ratio not kept).
        fill_color: padding grey level for ``"longest"``.
        resize_size: with ``"shortest"`` and a square ``image_size``, the shortest side is
            resized to this (not to ``image_size``) before the centre crop: torchvision's
            ``Resize(256)`` + ``CenterCrop(224)`` and timm's ``crop_pct`` (size / crop_pct).
            ``None`` (the default, left out of :meth:`to_dict`): ``image_size``.
    """

    image_size: int | tuple[int, int] = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    resize_size: int | None = None
    max_pixels: int | None = field(default=DEFAULT_MAX_PIXELS, compare=False)

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
                raise InvalidArgumentError(f"image_size must be a positive int or (height, width), got {size!r}")
            object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        elif not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise InvalidArgumentError(f"image_size must be a positive int or (height, width), got {size!r}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise InvalidArgumentError(f"{name} needs 3 values (R, G, B), got {values}")
            object.__setattr__(self, name, values)
        if any(s == 0 for s in self.std):
            raise InvalidArgumentError(f"std must not contain 0, got {self.std}")
        if self.interpolation not in _FILTERS:
            raise InvalidArgumentError(f"interpolation must be one of {sorted(_FILTERS)}, got {self.interpolation!r}")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise InvalidArgumentError(f"resize_mode must be 'shortest', 'longest' or 'squash', got {self.resize_mode!r}")
        if self.resize_size is not None:
            size = self.resize_size
            if not isinstance(size, int) or isinstance(size, bool) or size < max(self.output_size):
                raise InvalidArgumentError(f"resize_size must be an int of at least image_size {self.image_size!r}, "
                                           f"got {size!r}")
            if self.resize_mode != "shortest" or isinstance(self.image_size, tuple):
                raise InvalidArgumentError("resize_size needs resize_mode 'shortest' and a square (int) image_size")
        if max(self.output_size) > limits.MAX_IMAGE_SIDE or (self.resize_size or 0) > limits.MAX_IMAGE_SIDE:
            raise ResourceLimitError(
                f"image_size {self.output_size[0]}x{self.output_size[1]} is over the limit of "
                f"{limits.MAX_IMAGE_SIDE} pixels a side (one such image would take "
                f"{3 * 4 * self.output_size[0] * self.output_size[1] / 2**30:.1f} GiB as float32); if the model "
                "really takes images this large, raise cmhash.limits.MAX_IMAGE_SIDE (env CMHASH_MAX_IMAGE_SIDE)"
            )

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the preprocessed image."""
        size = self.image_size
        return size if isinstance(size, tuple) else (size, size)

    def to_dict(self) -> dict:
        """The config as JSON-ready data (``max_pixels`` is a runtime guard, not part of it)."""
        data = asdict(self)
        data.pop("max_pixels")
        if self.resize_size is None:  # left out, so readers from before resize_size take the record
            data.pop("resize_size")
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        if isinstance(self.image_size, tuple):
            data["image_size"] = list(self.image_size)
        return data

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> "ImagePreprocessor":
        known = {f.name for f in fields(cls)} - {"max_pixels"}
        unknown = set(data) - known
        if unknown:
            raise InvalidArgumentError(f"unknown image preprocessing keys {sorted(unknown)}; known: {sorted(known)}")
        kwargs = dict(data)
        if isinstance(kwargs.get("image_size"), list):
            kwargs["image_size"] = tuple(kwargs["image_size"])
        return cls(**kwargs, **overrides)

    def __call__(self, images: Any) -> np.ndarray:
        """Preprocess one image or a sequence of them into float32 (N, 3, H, W).

        A single source (path, bytes, file object, PIL image, (H, W[, C]) array) gives N = 1;
        a list or tuple of sources, or a uint8 array (N, H, W, C), gives one row each.
        """
        if isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4):
            items: Iterable = images
        else:
            items = [images]
        height, width = self.output_size
        if hasattr(items, "__len__"):
            limits.check_result_size("ImagePreprocessor", f"{len(items)} images of {height}x{width} as float32",
                                     len(items) * 3 * height * width * 4)
        rows = [self.pixels(item) for item in items]
        if not rows:
            return np.zeros((0, 3, height, width), dtype=np.float32)
        return np.stack(rows)

    @property
    def decode_side(self) -> int:
        """The ``min_side`` this preprocessing decodes with: its longer output side, so that
        a reduced JPEG decode is still at least as large as any resize target (the resize
        only shrinks)."""
        return max(self.output_size)

    def decode(self, source: Any) -> Image.Image:
        """One image source -> RGB PIL image, decoded as this preprocessing needs it
        (:func:`load_image` with ``min_side=decode_side``); training's data sources decode
        the same way."""
        return load_image(source, max_pixels=self.max_pixels, min_side=self.decode_side)

    def pixels(self, source: Any) -> np.ndarray:
        """One image source (anything :func:`load_image` takes) -> float32 (3, H, W): decode,
        then transform. Every inference path goes through here."""
        return self.transform(self.decode(source))

    def transform(self, image: Image.Image) -> np.ndarray:
        """One RGB PIL image (as :func:`load_image` returns) -> float32 (3, H, W)."""
        if image.mode != "RGB":
            raise InvalidArgumentError(f"transform takes RGB images from load_image, got mode {image.mode!r}")
        image = self.resize_and_crop(image)
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
        pixels /= np.float32(255)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        pixels -= mean
        pixels /= std
        return pixels

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """The geometric part of the transform, step for step as open_clip composes it."""
        target_h, target_w = self.output_size
        resample = _FILTERS[self.interpolation]
        if self.resize_mode == "squash":
            return _resize(image, (target_h, target_w), resample)
        if self.resize_mode == "longest":
            image = _resize(image, _keep_ratio_size(image, (target_h, target_w), longest=True), resample)
            return _center_crop(_pad_to(image, (target_h, target_w), self.fill_color), (target_h, target_w))
        if target_h == target_w:
            # torchvision Resize(int): shortest side -> size, the other int(size * long / short)
            width, height = image.size
            short, long = (width, height) if width <= height else (height, width)
            side = self.resize_size or target_h
            new_short, new_long = side, int(side * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
            image = _resize(image, (new_h, new_w), resample)
        else:
            # open_clip's ResizeKeepRatio(image_size) is built without its interpolation
            # argument, so non-square 'shortest' is always bicubic; kept for parity.
            size = _keep_ratio_size(image, (target_h, target_w), longest=False)
            image = _resize(image, size, Image.Resampling.BICUBIC)
        return _center_crop(image, (target_h, target_w))


_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _resize(image: Image.Image, size_hw: tuple[int, int], resample) -> Image.Image:
    # torchvision returns the image untouched when the size already matches, and otherwise
    # calls PIL's resize with no reducing_gap; so do we.
    height, width = size_hw
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample)


def _keep_ratio_size(image: Image.Image, target_hw: tuple[int, int], longest: bool) -> tuple[int, int]:
    # open_clip ResizeKeepRatio.get_params without its random scale / aspect parts.
    height, width = image.size[1], image.size[0]
    ratio_h = height / target_hw[0]
    ratio_w = width / target_hw[1]
    ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
    return round(height / ratio), round(width / ratio)


def _pad_to(image: Image.Image, target_hw: tuple[int, int], fill: int) -> Image.Image:
    # open_clip center_crop_or_pad: pad (left/top get the smaller half) when too small.
    crop_h, crop_w = target_hw
    width, height = image.size
    if crop_w <= width and crop_h <= height:
        return image
    left = (crop_w - width) // 2 if crop_w > width else 0
    top = (crop_h - height) // 2 if crop_h > height else 0
    right = (crop_w - width + 1) // 2 if crop_w > width else 0
    bottom = (crop_h - height + 1) // 2 if crop_h > height else 0
    return ImageOps.expand(image, border=(left, top, right, bottom), fill=(fill, fill, fill))


def _center_crop(image: Image.Image, target_hw: tuple[int, int]) -> Image.Image:
    crop_h, crop_w = target_hw
    width, height = image.size
    if crop_w > width or crop_h > height:
        # torchvision's CenterCrop pads with 0 first (never happens after a 'shortest' resize)
        image = _pad_to(image, target_hw, 0)
        width, height = image.size
        if (width, height) == (crop_w, crop_h):
            return image
    # Python's round (half to even), as torchvision uses
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


def preprocessor_from_open_clip(
    image_size: int | Sequence[int] = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    resize_mode: str | None = None,
    fill_color: int = 0,
) -> ImagePreprocessor:
    """An :class:`ImagePreprocessor` from ``open_clip.image_transform``'s arguments, with its
    defaults (CLIP mean/std, bicubic, shortest) for the ``None`` ones."""
    return ImagePreprocessor(
        image_size=tuple(image_size) if isinstance(image_size, (list, tuple)) else image_size,
        mean=tuple(mean) if mean else CLIP_MEAN,
        std=tuple(std) if std else CLIP_STD,
        interpolation=interpolation or "bicubic",
        resize_mode=resize_mode or "shortest",
        fill_color=fill_color,
    )
