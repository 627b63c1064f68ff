"""Image preprocessing, built with open_clip's own ``image_transform`` so that
training sees exactly what open_clip would feed the backbone. The parameters live in a
plain dict (saved with the model) from which the runtime, which has no torch, can
reproduce the evaluation transform: resize the shorter side to ``image_size`` with
``interpolation``, centre-crop ``image_size`` x ``image_size``, scale to [0, 1],
subtract ``mean`` and divide by ``std`` per channel.
"""

from __future__ import annotations

from typing import Callable

from ..errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision models
IMAGENET_STD = (0.229, 0.224, 0.225)

# Training augmentation: open_clip's own light one, a random crop of 90-100 % of the area
# (aspect ratio 3/4-4/3) resized back. No flips: captions say "left of".
TRAIN_CROP_SCALE = (0.9, 1.0)


def preprocess_config(image_size: int, mean=CLIP_MEAN, std=CLIP_STD, interpolation: str = "bicubic",
                      resize_mode: str = "shortest") -> dict:
    if interpolation not in ("bicubic", "bilinear"):
        raise ConfigError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    if resize_mode not in ("shortest", "longest", "squash"):
        raise ConfigError(f"resize_mode must be 'shortest', 'longest' or 'squash', got {resize_mode!r}")
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError("mean and std need one value per RGB channel")
    return {"image_size": int(image_size), "resize_mode": resize_mode, "interpolation": interpolation,
            "mean": [float(m) for m in mean], "std": [float(s) for s in std], "fill_color": 0}


def build_transform(preprocess: dict, train: bool = False, augment: bool = False) -> Callable:
    """PIL image -> float tensor (3, S, S). Augmentation only when ``train and augment``;
    a training run without augmentation uses the evaluation transform."""
    from open_clip.transform import AugmentationCfg, image_transform

    return image_transform(
        preprocess["image_size"],
        is_train=bool(train and augment),
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        resize_mode=preprocess["resize_mode"],
        interpolation=preprocess["interpolation"],
        fill_color=preprocess["fill_color"],
        aug_cfg=AugmentationCfg(scale=TRAIN_CROP_SCALE),
    )
