"""Errors raised by cmhash.training. They extend cmhash's own hierarchy, so
``except cmhash.CmhashError`` catches them too, and subclass the built-in a caller
would expect (``ValueError``, ``FileNotFoundError``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cmhash.errors import CmhashError


class ConfigError(CmhashError, ValueError):
    """A training option that cannot work (bits not a multiple of 8, unknown backbone, ...)."""


class DataError(CmhashError, ValueError):
    """Training data that is empty, inconsistent or malformed; the message names the record."""


class MissingImagesError(CmhashError, FileNotFoundError):
    """Image files named by the data are absent or unreadable.

    ``missing`` holds every absent path, ``unreadable`` every (path, reason) pair, so a
    caller can print or fix all of them at once; the message shows the first few.
    """

    SHOWN = 10

    def __init__(self, root: Path | None, missing: Sequence[Path], unreadable: Sequence[tuple[Path, str]] = (), total: int = 0):
        self.root = root
        self.missing = list(missing)
        self.unreadable = list(unreadable)
        self.total = total
        parts = []
        where = f" under {root}" if root is not None else ""
        if self.missing:
            shown = ", ".join(str(p) for p in self.missing[: self.SHOWN])
            more = f" ... and {len(self.missing) - self.SHOWN} more (all in .missing)" if len(self.missing) > self.SHOWN else ""
            parts.append(f"{len(self.missing)} of {total} image files are missing{where}: {shown}{more}")
        if self.unreadable:
            shown = "; ".join(f"{p} ({why})" for p, why in self.unreadable[: self.SHOWN])
            more = f" ... and {len(self.unreadable) - self.SHOWN} more (all in .unreadable)" if len(self.unreadable) > self.SHOWN else ""
            parts.append(f"{len(self.unreadable)} of {total} image files cannot be read as images: {shown}{more}")
        parts.append("Put the images in place (or point image_root at them) before training.")
        super().__init__(". ".join(parts))


class NonFiniteLossError(CmhashError, FloatingPointError):
    """A loss (or loss term) became NaN or infinite; training stops before the optimiser step.

    ``epoch``, ``step`` (within the epoch) and ``global_step`` count from 1, like the logs;
    ``where`` names the backward step (``ctx.backward_step(name=...)``) or "epoch mean".
    """

    def __init__(self, term: str, value: float, where: str, epoch: int, step: int, global_step: int, rank: int = 0) -> None:
        self.term, self.value, self.where = term, value, where
        self.epoch, self.step, self.global_step = epoch, step, global_step
        super().__init__(
            f"loss term {term!r} of {where} is {value} at epoch {epoch}, step {step} (global step {global_step}"
            f"{f', rank {rank}' if rank else ''}); training stopped. The 'last' checkpoint holds the last "
            "good epoch: lower the learning rate, check the inputs, or disable amp"
        )


class PretrainedWeightsError(ConfigError):
    """Pretrained backbone weights that cannot be had: a tag the library does not know, or
    weights that are neither in the library's cache nor downloadable (offline, no network).

    Raised before any data is read. ``tag`` is what was asked for, ``cache_dir`` the folder
    searched, ``valid_tags`` the library's own list of tags for the model.
    """

    SHOWN = 30

    def __init__(self, library: str, model: str, tag: str, reason: str, cache_dir: str | None,
                 valid_tags: Sequence[str]) -> None:
        self.library, self.model, self.tag, self.reason = library, model, tag, reason
        self.cache_dir = cache_dir
        self.valid_tags = list(valid_tags)
        shown = ", ".join(self.valid_tags[: self.SHOWN]) or "none"
        more = f" ... ({len(self.valid_tags)} in all)" if len(self.valid_tags) > self.SHOWN else ""
        where = f"; searched the cache {cache_dir}" if cache_dir else ""
        super().__init__(
            f"pretrained weights {tag!r} for {library} model {model!r}: {reason}{where}. "
            f"Valid tags for {model}: {shown}{more}. "
            f"To train from a local file instead, download it once on a machine with network (see docs/pretrained.md) "
            f"and pass model.pretrained=/path/to/weights (a state dict in {library}'s own format, "
            f".safetensors or .pth/.bin)"
        )


class MissingWeightsFileError(CmhashError, FileNotFoundError):
    """A weights file named by the config (``model.pretrained``, ``model.backbone_weights``) is absent."""
