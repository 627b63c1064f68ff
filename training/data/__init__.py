"""Data for training: sources, vocabulary, splits, preprocessing, the torch dataset.

Typical use::

    data = load_data({"source": "shapes", "n": 3000, "seed": 0})
    split = make_split(len(data), {"query": 500, "train": 2000, "seed": 0})
    data = data.with_vocabulary(data.build_vocabulary(split.train))  # fixed-vocabulary sources skip this
    train_set = CrossModalDataset(data, split.train, build_transform(preprocess, train=True, augment=True))
"""

from __future__ import annotations

import inspect

from ..errors import ConfigError
from .dataset import CrossModalDataset
from .shapes import LABEL_NAMES as SHAPES_LABEL_NAMES, captions, make_shapes
from .sources import (CrossModalData, ImageFiles, check_image_files, load_manifest, load_mat_layout,
                      load_mirflickr25k, load_mirflickr_mini, read_label_names)
from .splits import SPLIT_PRESETS, Split, SplitSizes, make_split
from .transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, build_transform, preprocess_config

SOURCES = {
    "shapes": make_shapes,
    "manifest": load_manifest,
    "mat": load_mat_layout,
    "mirflickr25k": load_mirflickr25k,
    "mirflickr-mini": load_mirflickr_mini,
}


def load_data(config: dict) -> CrossModalData:
    """``{"source": name, **options}`` -> data; the options are the loader's arguments
    (``make_shapes``, ``load_manifest``, ``load_mat_layout``, ``load_mirflickr25k``,
    ``load_mirflickr_mini``)."""
    config = dict(config)
    source = config.pop("source", None)
    if source not in SOURCES:
        raise ConfigError(f"unknown data source {source!r}; available: {sorted(SOURCES)}")
    loader = SOURCES[source]
    allowed = set(inspect.signature(loader).parameters)
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ConfigError(f"data source {source!r} has no option(s) {unknown}; its options: {sorted(allowed)}")
    return loader(**config)


__all__ = [
    "CrossModalData", "CrossModalDataset", "ImageFiles", "Split", "SplitSizes",
    "SPLIT_PRESETS", "make_split", "build_transform", "preprocess_config", "CLIP_MEAN", "CLIP_STD",
    "IMAGENET_MEAN", "IMAGENET_STD", "load_data", "SOURCES", "make_shapes", "captions", "SHAPES_LABEL_NAMES",
    "load_manifest", "load_mat_layout", "load_mirflickr25k", "load_mirflickr_mini", "check_image_files",
    "read_label_names",
]
