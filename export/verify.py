"""Real inputs for calibration and verification, and the comparison of a variant with PyTorch.

Inputs come from (first that applies):

1. ``verify_data`` as a path: a folder of images, an image file list, or a manifest
   (``image``, ``text``/``tags``, ``labels``; see :mod:`cmhash.inputs`). Images are decoded
   and preprocessed by the runtime's own code, texts tokenised with the bundle's vocabulary.
2. ``verify_data`` as a dataset: a sequence of training items ``(image, text, labels, index)``
   already preprocessed (what the trainer iterates).
3. Nothing given: the training data of the checkpoint's run, rebuilt by
   ``cmhash.training.run.prepare_data`` from the config saved in the checkpoint.

A variant passes when its codes agree with the PyTorch tower's under the contract of
:class:`cmhash.reference.Contract` (fp32 within 1e-4 on every tanh value and on at least
99.9 % of the bits; fp16 and int8 on at least ``bit_floor``, 97 %, of the bits). With labels and both modalities on the same items, the mAP of each
variant's codes (the first fifth of the items as queries, the rest as the database) is
reported beside PyTorch's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmhash.codes import pack_codes
from cmhash.errors import CmhashError, ExportError
from cmhash.inputs import read_collection, text_input
from cmhash.metrics import mean_average_precision
from cmhash.preprocess import ImagePreprocessor

log = logging.getLogger("cmhash.export")


@dataclass
class RealInputs:
    """Preprocessed model inputs; rows of ``pixels``, ``bow`` and ``labels`` are the same
    items when ``paired``."""

    source: str
    pixels: np.ndarray | None = None  # (n, 3, H, W) float32
    bow: np.ndarray | None = None  # (n, d) float32
    labels: np.ndarray | None = None  # (n, C) multi-hot
    paired: bool = False
    skipped: list[dict] = field(default_factory=list)

    def of(self, modality: str) -> np.ndarray | None:
        return self.pixels if modality == "image" else self.bow

    def describe(self) -> dict:
        return {
            "source": self.source,
            "image_items": 0 if self.pixels is None else int(len(self.pixels)),
            "text_items": 0 if self.bow is None else int(len(self.bow)),
            "labels": self.labels is not None,
            "skipped": len(self.skipped),
            "skipped_examples": self.skipped[:5],
        }


def inputs_from_path(path: str | Path, pre: ImagePreprocessor, vocabulary, text_dim: int,
                     label_names: list[str], limit: int) -> RealInputs:
    """Real inputs from a folder of images, an image list or a manifest."""
    path = Path(path)
    records = read_collection(path, "image")
    pixels, bows, labels, skipped = [], [], [], []
    want_text = any(r.has_text for r in records)
    position = {name: j for j, name in enumerate(label_names)}
    want_labels = bool(label_names) and all(r.labels is not None for r in records if r.problem is None)
    for record in records:
        if len(pixels) >= limit:
            break
        try:
            if record.problem:
                raise ExportError(record.problem)
            if record.image is None:
                raise ExportError("no image")
            image = pre.pixels(record.image)
            if want_text:
                item = text_input(record, vocabulary, text_dim)
                bow = item if isinstance(item, np.ndarray) else _encode_words(item, vocabulary, text_dim)
            if want_labels:
                unknown = [x for x in record.labels if x not in position]
                if unknown:
                    raise ExportError(f"labels {unknown} are not among the model's {len(label_names)} label names")
                row = np.zeros(len(label_names), dtype=np.float32)
                row[[position[x] for x in record.labels]] = 1.0
        except (CmhashError, OSError) as exc:
            skipped.append({"item": record.name, "reason": str(exc)})
            continue
        pixels.append(image)
        if want_text:
            bows.append(bow)
        if want_labels:
            labels.append(row)
    if not pixels:
        raise ExportError(f"{path}: none of its items could be read for verification ({len(skipped)} skipped)")
    return RealInputs(
        source=str(path),
        pixels=np.stack(pixels),
        bow=np.stack(bows) if want_text else None,
        labels=np.stack(labels) if want_labels else None,
        paired=want_text,
        skipped=skipped,
    )


def _encode_words(parts, vocabulary, dim: int) -> np.ndarray:
    if vocabulary is None:
        raise ExportError(f"the model has no vocabulary (it takes {dim}-dim bag-of-words vectors); give tag indices")
    return vocabulary.encode(parts)


def inputs_from_dataset(dataset: Any, limit: int, source: str) -> RealInputs:
    """Real inputs from training items ``(image, text, labels, index)``, spread evenly over
    the dataset."""
    n = len(dataset)
    if n == 0:
        raise ExportError(f"{source} is empty; there is nothing to verify with")
    picks = np.unique(np.linspace(0, n - 1, num=min(limit, n)).round().astype(int))
    images, texts, labels = [], [], []
    for i in picks:
        image, text, label, *_ = dataset[int(i)]
        images.append(torch.as_tensor(image).float().numpy())
        texts.append(torch.as_tensor(text).float().numpy())
        labels.append(torch.as_tensor(label).float().numpy())
    return RealInputs(source=source, pixels=np.stack(images), bow=np.stack(texts), labels=np.stack(labels), paired=True)


def inputs_from_training_data(trained, limit: int) -> RealInputs:
    """The checkpoint's own training data, rebuilt from its config."""
    try:
        from cmhash.training.run import prepare_data
    except ImportError:
        prepare_data = None
    if prepare_data is None or trained.run_config is None or not trained.run_config.data:
        raise ExportError(
            f"{trained.path}: cannot rebuild the training data from this checkpoint; pass verify_data "
            "(--verify-data: a folder of images or a manifest with images, texts and labels)"
        )
    try:
        prepared = prepare_data(trained.run_config, vocabulary=trained.vocabulary())
    except (CmhashError, OSError) as exc:
        raise ExportError(f"{trained.path}: the training data could not be rebuilt from its config ({exc}); "
                          "pass verify_data") from exc
    dataset = prepared.database  # the eval transform (the training set may be augmented)
    return inputs_from_dataset(dataset, limit, f"training data of {trained.path}")


# --- running and comparing ------------------------------------------------------------------------


@torch.no_grad()
def torch_outputs(tower: torch.nn.Module, batch: np.ndarray, batch_size: int = 64) -> np.ndarray:
    tower.eval()
    outs = [tower(torch.from_numpy(np.ascontiguousarray(batch[i : i + batch_size]))).float().numpy()
            for i in range(0, len(batch), batch_size)]
    return np.concatenate(outs)


def run_backend(backend, batch: np.ndarray, batch_size: int = 64) -> np.ndarray:
    outs = [np.asarray(backend.run(np.ascontiguousarray(batch[i : i + batch_size], dtype=np.float32)), dtype=np.float32)
            for i in range(0, len(batch), batch_size)]
    return np.concatenate(outs)


def retrieval_map(image_out: np.ndarray, text_out: np.ndarray, labels: np.ndarray) -> dict:
    """mAP@all both ways on codes from tanh outputs: first fifth queries, rest database."""
    n = len(labels)
    nq = max(1, n // 5)
    img, txt = pack_codes(image_out, input="sign"), pack_codes(text_out, input="sign")
    i2t = mean_average_precision(img[:nq], txt[nq:], labels[:nq], labels[nq:])
    t2i = mean_average_precision(txt[:nq], img[nq:], labels[:nq], labels[nq:])
    return {"i2t": float(i2t), "t2i": float(t2i), "queries": int(nq), "database": int(n - nq)}
