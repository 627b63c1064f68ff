"""A trained method back from its checkpoint, plus what the bundle needs from checkpoint.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
    run_config = None
    try:
        from cmhash.training.run import load_trained as run_load_trained  # the project's own loader
    except ImportError:
        run_load_trained = None
    if run_load_trained is not None:
        try:
            run_config, method, _ = run_load_trained(path)
        except (ValueError, RuntimeError, KeyError) as exc:  # unknown method, weights that do not fit, old meta
            raise ExportError(f"{path}: cannot rebuild the trained method: {exc}") from exc
    else:
        method = _load_method(path, meta)
    for module in method.modules().values():
        module.to("cpu").eval()
    return Trained(path=path, meta=meta, method=method, run_config=run_config)


def _load_method(path: Path, meta: dict):
    """Rebuild the method from checkpoint.json and load its weights (used until
    cmhash.training.run.load_trained is available)."""
    from cmhash.training.method import DatasetInfo, get_method

    ckpt = ckpt_io.read_checkpoint(path)
    try:
        cls = get_method(meta["method"])
    except ValueError as exc:
        raise ExportError(f"{path}: {exc}; import the module that registers it first") from None
    config = cls.Config.from_dict(meta["config"]["model"])
    n_train = int(meta.get("n_train") or 1)  # only sizes per-sample buffers, which the towers never use
    info = DatasetInfo(
        n_train=n_train,
        n_labels=int(meta["n_labels"]),
        text_dim=int(meta["text_dim"]),
        train_labels=torch.zeros(n_train, int(meta["n_labels"])),
        label_names=list(meta.get("label_names") or []),
        image_size=int(meta.get("image_size", 224)),
        preprocessing=dict(meta.get("preprocessing") or {}),
        vocabulary=meta.get("vocabulary"),
    )
    torch.manual_seed(0)
    method = cls(config, info)
    modules = method.modules()
    if sorted(modules) != sorted(meta.get("modules", modules)):
        raise ExportError(f"{path}: checkpoint modules {meta.get('modules')} do not match the method's {sorted(modules)}")
    for name, module in modules.items():
        try:
            module.load_state_dict(ckpt.module_state(name), strict=True)
        except RuntimeError as exc:
            raise ExportError(f"{path}: the weights of {name!r} do not fit the method built from its config: {exc}") from exc
    state = ckpt.method_state()
    if state:
        method.load_state_tensors(state)
    return method
