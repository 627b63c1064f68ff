"""A trained method back from its checkpoint, plus what the bundle needs from checkpoint.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmhash.errors import ExportError
from cmhash.preprocess import ImagePreprocessor
from cmhash.text import Vocabulary
from cmhash.training.run import load_trained


@dataclass
class Trained:
    """A trained method in eval mode on CPU, and its checkpoint's metadata."""

    path: Path
    meta: dict[str, Any]
    method: Any  # HashingMethod
    run_config: Any = None  # the RunConfig saved with it

    @classmethod
    def load(cls, checkpoint: str | Path) -> Trained:
        """The method saved in ``checkpoint`` (a checkpoint directory, or a run folder meaning
        its ``best/``), rebuilt by :func:`cmhash.training.run.load_trained`: weights and state
        restored, every module in eval mode, on CPU."""
        try:
            run_config, method, ckpt = load_trained(checkpoint)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:  # unreadable, unknown method, weights that do not fit
            raise ExportError(f"cannot read the checkpoint {checkpoint}: {exc}") from exc
        return cls(path=ckpt.path, meta=ckpt.meta, method=method, run_config=run_config)

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
