"""The torch view of a split: ``(image, text_bow, labels, index)`` per item."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .sources import CrossModalData
from .transforms import ImageTransform


class CrossModalDataset(Dataset):
    """Samples ``indices`` of ``data``.

    Item k is ``(image (3,S,S) float, text bag of words (V,) float, labels (C,) float, k)``:
    ``k`` is the position inside this dataset (0..len-1), the row of the per-sample
    code buffers; ``indices[k]`` is the sample's row in ``data``. Images are decoded and
    transformed per item, or taken from ``images`` (preprocessed once, by data row).
    """

    def __init__(self, data: CrossModalData, indices: Sequence[int], transform: ImageTransform | None,
                 images: Callable[[int], torch.Tensor] | None = None):
        if data.bow is None:
            raise DataError(f"{data.name}: build the vocabulary before making datasets (data.with_vocabulary)")
        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.size == 0:
            raise DataError(f"{data.name}: a dataset needs at least one sample")
        if self.indices.min() < 0 or self.indices.max() >= len(data):
            raise DataError(f"{data.name}: sample indices outside [0, {len(data)})")
        if (transform is None) == (images is None):
            raise ValueError("give either a transform (images decoded per item) or preprocessed images")
        self.transform = transform
        self.images = images  # e.g. run.RowTensors: data row -> preprocessed pixels or features

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> torch.Tensor:
        """All labels of this dataset, (len, C): the training label matrix (the label graph and the code update read it)."""
        return torch.from_numpy(self.data.labels[self.indices])

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        image = self.images(i) if self.images is not None else self.transform(self.transform.load(self.data.images, i))
        text = torch.from_numpy(self.data.text(i))
        labels = torch.from_numpy(self.data.labels[i])
        return image, text, labels, k
