"""Image preprocessing for training: the runtime's own, so that training sees exactly the
pixels the SDK sees.

A method records its preprocessing as a plain dict (:func:`preprocess_config`, the
runtime's :class:`cmhash.preprocess.ImagePreprocessor` config, saved with the model and
copied into the bundle). The evaluation transform *is* that preprocessor (resize the shorter
side to ``image_size`` with ``interpolation``, centre crop, scale to [0, 1], subtract
``mean``, divide by ``std``), returned as a torch tensor. Only the random training
augmentation comes from open_clip (``image_transform(is_train=True)``), applied to the
same decoded image (:func:`cmhash.preprocess.load_image`, through the data sources).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from cmhash.preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessor

from ..errors import ConfigError

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "TRAIN_CROP_SCALE", "ImageTransform",
           "build_transform", "preprocess_config"]

# Training augmentation: open_clip's own light one, a random crop of 90-100 % of the area
# (aspect ratio 3/4-4/3) resized back. No flips: captions say "left of".
TRAIN_CROP_SCALE = (0.9, 1.0)


def preprocess_config(image_size: int, mean=CLIP_MEAN, std=CLIP_STD, interpolation: str = "bicubic",
                      resize_mode: str = "shortest") -> dict:
    """The preprocessing config of an image tower, validated by the runtime's preprocessor."""
    return _preprocessor(dict(image_size=image_size, mean=mean, std=std, interpolation=interpolation,
                              resize_mode=resize_mode)).to_dict()


class ImageTransform:
    """RGB PIL image -> float tensor (3, H, W), and the decoding it expects: data sources
    decode with ``load(images, i)``, which passes ``min_side`` as the runtime's
    :meth:`~cmhash.preprocess.ImagePreprocessor.decode` does, so that training and the SDK
    see the same pixels."""

    def __init__(self, function: Callable, min_side: int):
        self.function = function  # picklable (DataLoader workers): a partial or open_clip's Compose
        self.min_side = min_side

    def __call__(self, image) -> torch.Tensor:
        return self.function(image)

    def load(self, images, i: int):
        """Sample i of an image source (``CrossModalData.images``), decoded."""
        return images.load(i, min_side=self.min_side)


def build_transform(preprocess: dict, train: bool = False, augment: bool = False) -> ImageTransform:
    """RGB PIL image (from a data source) -> float tensor (3, H, W). Augmentation only when
    ``train and augment``; otherwise the runtime's evaluation transform, bit for bit. Both
    take images decoded with the runtime's ``min_side`` (:meth:`ImageTransform.load`)."""
    pre = _preprocessor(preprocess)
    if not (train and augment):
        # a partial, not a lambda: DataLoader workers pickle it
        return ImageTransform(partial(_evaluation_transform, pre), pre.decode_side)
    from open_clip.transform import AugmentationCfg, image_transform

    return ImageTransform(image_transform(
        pre.image_size,
        is_train=True,
        mean=pre.mean,
        std=pre.std,
        resize_mode=pre.resize_mode,
        interpolation=pre.interpolation,
        fill_color=pre.fill_color,
        aug_cfg=AugmentationCfg(scale=TRAIN_CROP_SCALE),
    ), pre.decode_side)


def _preprocessor(config: dict) -> ImagePreprocessor:
    if not isinstance(config, dict):
        raise ConfigError(f"image preprocessing must be a mapping, got {type(config).__name__}")
    try:
        return ImagePreprocessor.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"image preprocessing: {exc}") from None


def _evaluation_transform(pre: ImagePreprocessor, image) -> torch.Tensor:
    return torch.from_numpy(pre.transform(image))
