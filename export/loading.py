"""A trained method back from its checkpoint, plus what the bundle needs from checkpoint.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmhash.errors import ExportError
from cmhash.preprocess import ImagePreprocessor
from cmhash.text import Vocabulary
from cmhash.training import checkpoint as ckpt_io


@dataclass
class Trained:
    """A trained method in eval mode on CPU, and its checkpoint's metadata."""

    path: Path
    meta: dict[str, Any]
    method: Any  # HashingMethod
    run_config: Any = None  # RunConfig when cmhash.training.run loaded it

    @property
    def bits(self) -> int:
        return int(self.meta["bits"])

    def image_preprocessor(self) -> ImagePreprocessor:
        """The evaluation transform training used, as the runtime's preprocessor."""
        pre = dict(self.meta.get("preprocessing") or {})
        pre.setdefault("image_size", self.meta.get("image_size", 224))
        try:
            return ImagePreprocessor.from_dict(pre)
        except (TypeError, ValueError) as exc:
            raise ExportError(f"{self.path}: the checkpoint's image preprocessing {pre} is not usable: {exc}") from exc

    def vocabulary(self) -> Vocabulary | None:
        data = self.meta.get("vocabulary")
        return Vocabulary.from_dict(data) if data is not None else None

    @property
    def text_dim(self) -> int:
        return int(self.meta["text_dim"])


def read_meta(checkpoint: str | Path) -> tuple[Path, dict]:
    try:
        path = ckpt_io.resolve(checkpoint)
        return path, json.loads((path / ckpt_io.META_FILE).read_text())
    except (OSError, json.JSONDecodeError, ckpt_io.CheckpointError) as exc:
        raise ExportError(f"cannot read the checkpoint {checkpoint}: {exc}") from exc


def load_trained(checkpoint: str | Path) -> Trained:
    """The method saved in ``checkpoint`` (a directory written by the trainer), weights and
    state restored, every module in eval mode, on CPU."""
    checkpoint = Path(checkpoint)
    if not ckpt_io.exists(checkpoint) and ckpt_io.exists(checkpoint / "best"):
        checkpoint = checkpoint / "best"  # a run's out_dir means its best checkpoint
    path, meta = read_meta(checkpoint)
    from cmhash.training.run import load_trained as run_load_trained  # the one way a method is rebuilt

    try:
        run_config, method, _ = run_load_trained(path)
    except (ValueError, RuntimeError, KeyError) as exc:  # unknown method, weights that do not fit, old meta
        raise ExportError(f"{path}: cannot rebuild the trained method: {exc}") from exc
    for module in method.modules().values():
        module.to("cpu").eval()
    return Trained(path=path, meta=meta, method=method, run_config=run_config)

