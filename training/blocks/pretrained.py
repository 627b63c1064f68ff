"""Pretrained backbone weights, named the way each library names them, fetched through the
library's own download and cache.

``model.pretrained`` takes, by backbone family:

- ``clip:<model>`` (open_clip): a pretrained tag of that model (``openai``,
  ``laion2b_s34b_b79k``, ... : ``open_clip.list_pretrained_tags_by_model``), a Hugging Face
  repository in open_clip's layout (``hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K``: its
  ``open_clip_config.json`` gives the architecture and preprocessing), or a local checkpoint
  file in open_clip's format (a whole-CLIP state dict, ``visual.*`` keys, or the image tower's own).
- ``timm:<model>``: a pretrained tag (``ms_in22k_ft_in1k``) or the full tagged name
  (``swin_small_patch4_window7_224.ms_in22k_ft_in1k``; ``timm.list_pretrained``), or a local file
  in timm's format (loaded by timm itself, with the model's checkpoint filter).
- ``torchvision:<model>``: a weights enum entry (``AlexNet_Weights.IMAGENET1K_V1``, or just
  ``IMAGENET1K_V1`` / ``DEFAULT``), or a local ``torch.save`` state dict.

Tags are looked up in the library's own registry (no network for that). Weights come from
the library's cache (the Hugging Face hub cache, ``HF_HOME`` / ``HF_HUB_CACHE``, for open_clip
and timm; ``TORCH_HOME/hub/checkpoints`` for torchvision and URL-only entries) and are
downloaded into it only when the machine is online: with ``HF_HUB_OFFLINE=1`` nothing is
downloaded, and a miss is a :class:`PretrainedWeightsError` naming the tag, the cache folder,
the valid tags and how to pass a local file. Nothing is unpickled (``weights_only=True``).

A tag also brings the preprocessing the weights were trained with (open_clip's
``preprocess_cfg``, timm's ``pretrained_cfg``, torchvision's ``transforms()``), recorded
with the model and copied into the bundle, so inference sees what the backbone saw.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..data.transforms import CLIP_MEAN, CLIP_STD, preprocess_config
from ..errors import ConfigError, MissingWeightsFileError, PretrainedWeightsError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_ARCHITECTURE_ONLY = contextvars.ContextVar("cmhash_pretrained_architecture_only", default=False)


@dataclass(frozen=True)
class PretrainedWeights:
    """Resolved pretrained weights: which library entry, which file, and what it needs.

    ``path`` is the file to load (in the library's cache, or the user's), ``None`` inside
    :func:`architecture_only`; ``preprocess`` the weights' own image preprocessing (``None``
    for a local file: the backbone's default applies); ``model_cfg`` open_clip's model
    config the weights were trained with (architecture, ``quick_gelu``)."""

    library: str
    model: str
    tag: str | None
    path: Path | None
    preprocess: dict | None = None
    model_cfg: dict | None = field(default=None, compare=False)

    @property
    def sha256(self) -> str | None:
        return None if self.path is None else file_sha256(self.path)

    def provenance(self) -> dict[str, Any]:
        """What a checkpoint and a bundle record: library, model, tag, file name, sha256."""
        return {"library": self.library, "model": self.model, "tag": self.tag,
                "file": None if self.path is None else self.path.name, "sha256": self.sha256}


@contextlib.contextmanager
def architecture_only() -> Iterator[None]:
    """Within this block backbones are built with the architecture their weights need but
    no weights are fetched or loaded (a trained checkpoint's weights replace them)."""
    token = _ARCHITECTURE_ONLY.set(True)
    try:
        yield
    finally:
        _ARCHITECTURE_ONLY.reset(token)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime): weights files are large and
    read several times per run."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def is_offline() -> bool:
    """True when downloads are switched off (``HF_HUB_OFFLINE=1``, for every library here)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or value.upper() in ("1", "ON", "YES", "TRUE")


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def torch_cache_dir() -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _local_file(pretrained: str) -> Path | None:
    """``pretrained`` as a local file, or None when it is a tag. Inside
    :func:`architecture_only` the file need not exist any more."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if path.suffix in WEIGHT_SUFFIXES or ("/" in pretrained and not pretrained.startswith("hf-hub:")):
        if _ARCHITECTURE_ONLY.get():
            return path
        raise MissingWeightsFileError(f"weights file not found: {path} (model.pretrained names a file that does not "
                                      f"exist; give an existing file or a tag of the library)")
    return None


def _file_weights(library: str, model: str, path: Path, model_cfg: dict | None = None) -> PretrainedWeights:
    """A local file in the library's format: no tag, so the backbone's default preprocessing."""
    return PretrainedWeights(library, model, None, None if _ARCHITECTURE_ONLY.get() else path, None, model_cfg)


def _hf_download(library: str, model: str, tag: str, repo: str, filenames: list[str], valid: list[str]) -> Path:
    """The first of ``filenames`` in Hugging Face repository ``repo`` that the hub cache holds or
    (online) the hub serves, as the library itself would fetch it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    offline = is_offline()
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=hf_cache_dir(), local_files_only=offline))
        except LocalEntryNotFoundError as exc:
            if offline:
                continue  # another of the names may be in the cache
            reason = (f"cannot reach the Hugging Face hub for {repo}/{filename} and it is not in the cache "
                      f"({str(exc).splitlines()[0][:200]}); on a machine without network set HF_HUB_OFFLINE=1")
            raise PretrainedWeightsError(library, model, tag, reason, hf_cache_dir(), valid) from exc
        except EntryNotFoundError:  # the hub has the repository but not this file: the next name
            continue
        except Exception as exc:  # unknown repository, HTTP errors
            reason = f"cannot download {repo}/{filename} ({str(exc).splitlines()[0][:200]})"
            raise PretrainedWeightsError(library, model, tag, reason, hf_cache_dir(), valid) from exc
    reason = (f"{repo} ({' or '.join(filenames)}) is not in the cache and HF_HUB_OFFLINE is set, so nothing is "
              f"downloaded" if offline else f"the hub repository {repo} has none of {filenames}")
    raise PretrainedWeightsError(library, model, tag, reason, hf_cache_dir(), valid)


def _url_download(library: str, model: str, tag: str, url: str, directory: str, valid: list[str],
                  check_hash: bool = False) -> Path:
    """The file of ``url`` in ``directory`` (the library's URL cache), downloaded when online;
    ``check_hash``: the name's ``-<hex>.`` part must begin its sha256 (torchvision's files)."""
    import torch

    target = Path(directory) / os.path.basename(url.split("?")[0])
    if target.is_file():
        return target
    if is_offline():
        raise PretrainedWeightsError(library, model, tag, f"{target.name} is not in the cache and HF_HUB_OFFLINE is "
                                     f"set, so nothing is downloaded", directory, valid)
    target.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(target.name) if check_hash else None  # as torch.hub checks torchvision's
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=match.group(1) if match else None)
    except Exception as exc:
        raise PretrainedWeightsError(library, model, tag, f"cannot download {url} ({exc})", directory, valid) from exc
    return target


# --------------------------------------------------------------------------- open_clip


def _open_clip_preprocess(image_size: int, cfg: dict) -> dict:
    return preprocess_config(image_size, tuple(cfg.get("mean") or CLIP_MEAN), tuple(cfg.get("std") or CLIP_STD),
                             cfg.get("interpolation") or "bicubic", resize_mode=cfg.get("resize_mode") or "shortest")


def resolve_open_clip(model: str, pretrained: str, base_cfg: dict | None) -> PretrainedWeights:
    """``pretrained`` for the open_clip model ``model`` (``base_cfg``: its model config)."""
    import open_clip

    valid = list(open_clip.list_pretrained_tags_by_model(model)) if base_cfg is not None else []
    fetch = not _ARCHITECTURE_ONLY.get()
    local = _local_file(pretrained)
    if local is not None:
        return _file_weights("open_clip", model, local, base_cfg)
    if pretrained.startswith("hf-hub:"):
        repo = pretrained.removeprefix("hf-hub:").strip("/")
        config_path = _hf_download("open_clip", model, pretrained, repo, ["open_clip_config.json"], valid)
        hub = json.loads(config_path.read_text())
        model_cfg = hub.get("model_cfg")
        if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg:
            raise ConfigError(f"{config_path} has no open_clip 'model_cfg' with a 'vision_cfg'")
        path = _hf_download("open_clip", model, pretrained, repo, ["open_clip_model.safetensors",
                                                                   "open_clip_pytorch_model.bin"], valid) if fetch else None
        preprocess = _open_clip_preprocess(model_cfg["vision_cfg"].get("image_size", 224), hub.get("preprocess_cfg", {}))
        return PretrainedWeights("open_clip", model, pretrained, path, preprocess, model_cfg)
    cfg = open_clip.get_pretrained_cfg(model, pretrained) if base_cfg is not None else {}
    if not cfg:
        raise PretrainedWeightsError("open_clip", model, pretrained, "open_clip has no such pretrained tag for this "
                                     "model", None, valid)
    model_cfg = dict(base_cfg)
    if cfg.get("quick_gelu"):  # e.g. OpenAI's weights were trained with QuickGELU
        model_cfg["quick_gelu"] = True
    path = None
    if fetch:
        hub = cfg.get("hf_hub", "")
        if hub:  # 'org/repo/file' or 'org/repo/' (the default file name), as open_clip reads it
            from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

            repo, filename = os.path.split(hub)
            filename = filename or HF_WEIGHTS_NAME
            path = _hf_download("open_clip", model, pretrained, repo,
                                [*_get_safe_alternatives(filename), filename], valid)
        else:
            path = _url_download("open_clip", model, pretrained, cfg["url"], os.path.expanduser("~/.cache/clip"), valid)
    preprocess = _open_clip_preprocess(base_cfg["vision_cfg"].get("image_size", 224), cfg)
    return PretrainedWeights("open_clip", model, pretrained, path, preprocess, model_cfg)


def load_open_clip_tower(tower, path: Path) -> None:
    """Load an open_clip checkpoint file into an image tower: open_clip's own reader (``state_dict``
    wrappers, ``module.`` prefixes, safetensors), then its ``visual.*`` part."""
    from open_clip.factory import load_state_dict

    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as exc:  # TorchScript archives and pickled objects both land here
        raise ConfigError(f"{path} is not a state dict that can be read without unpickling (TorchScript archives such "
                          f"as OpenAI's original ViT-B-32.pt are not; use the tag 'openai', whose hub file is one)") from exc
    if any(k.startswith("visual.") for k in state):  # a whole CLIP checkpoint: keep the image tower
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path} does not fit this open_clip image tower: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")


# --------------------------------------------------------------------------- timm


def timm_tagged_name(model: str, pretrained: str) -> str:
    """``swin_small_patch4_window7_224`` + ``ms_in22k_ft_in1k`` (or the full tagged name) ->
    the tagged name timm's registry knows."""
    import timm

    full = pretrained if "." in pretrained else f"{model}.{pretrained}"
    valid = timm.list_pretrained(f"{model}.*")
    if full.partition(".")[0] != model or full not in valid:
        raise PretrainedWeightsError("timm", model, pretrained, "timm has no such pretrained tag for this model",
                                     None, valid)
    return full


def _timm_preprocess(cfg, image_size: int | None = None) -> dict:
    if cfg.crop_mode not in (None, "center"):
        raise ConfigError(f"timm's crop_mode {cfg.crop_mode!r} of {cfg.architecture}.{cfg.tag} is not supported; "
                          "set model.image_mean/std or use another tag")
    size = int(image_size or cfg.input_size[-1])  # a smaller variant of the architecture keeps crop_pct
    resize = int(math.floor(size / cfg.crop_pct)) if cfg.crop_pct else size
    pre = preprocess_config(size, tuple(cfg.mean), tuple(cfg.std), cfg.interpolation)  # unsupported: a ConfigError
    if resize != size:
        pre["resize_size"] = resize
    return pre


def resolve_timm(model: str, pretrained: str, timm_name: str, image_size: int | None = None) -> PretrainedWeights:
    """``pretrained`` for timm's ``model`` (cmhash's name; ``timm_name`` the architecture in timm,
    built for ``image_size`` pixels when that is not the tag's own input size)."""
    import timm

    local = _local_file(pretrained)
    if local is not None:
        return _file_weights("timm", timm_name, local)
    full = timm_tagged_name(timm_name, pretrained)
    cfg = timm.get_pretrained_cfg(full)
    valid = timm.list_pretrained(f"{timm_name}.*")
    path = None
    if not _ARCHITECTURE_ONLY.get():
        if cfg.hf_hub_id:
            names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            path = _hf_download("timm", timm_name, full, cfg.hf_hub_id, names, valid)
        elif cfg.url:
            path = _url_download("timm", timm_name, full, cfg.url, torch_cache_dir(), valid)
        else:
            raise PretrainedWeightsError("timm", timm_name, full, "timm lists no download location for it",
                                         None, valid)
    return PretrainedWeights("timm", timm_name, full, path, _timm_preprocess(cfg, image_size))


# --------------------------------------------------------------------------- torchvision


def torchvision_weights(model: str, pretrained: str):
    """The torchvision weights enum entry ``pretrained`` names for ``model``."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(model)
    except (ValueError, KeyError):
        raise PretrainedWeightsError("torchvision", model, pretrained, "torchvision has no weights for this model",
                                     None, []) from None
    valid = [f"{enum.__name__}.{entry.name}" for entry in enum] + [f"{enum.__name__}.DEFAULT"]
    name = pretrained.removeprefix(f"{enum.__name__}.")
    entry = getattr(enum, name, None) if "." not in name else None
    if entry is None or not isinstance(entry, enum):
        raise PretrainedWeightsError("torchvision", model, pretrained, "torchvision has no such weights for this model",
                                     None, valid)
    return entry, valid


def _torchvision_preprocess(entry) -> dict:
    transform = entry.transforms()
    crop = int(transform.crop_size[0])
    resize = int(transform.resize_size[0])
    pre = preprocess_config(crop, tuple(transform.mean), tuple(transform.std), transform.interpolation.value)
    if resize != crop:
        pre["resize_size"] = resize
    return pre


def resolve_torchvision(model: str, pretrained: str) -> PretrainedWeights:
    local = _local_file(pretrained)
    if local is not None:
        return _file_weights("torchvision", model, local)
    entry, valid = torchvision_weights(model, pretrained)
    tag = f"{type(entry).__name__}.{entry.name}"
    path = None if _ARCHITECTURE_ONLY.get() else _url_download("torchvision", model, tag, entry.url,
                                                                torch_cache_dir(), valid, check_hash=True)
    return PretrainedWeights("torchvision", model, tag, path, _torchvision_preprocess(entry))


def check_one_weights_source(config) -> None:
    """A method config names its backbone's starting weights once: ``pretrained`` (a tag or a
    library-format file) or ``backbone_weights`` (a file with the backbone's own keys)."""
    if getattr(config, "pretrained", None) is not None and getattr(config, "backbone_weights", None) is not None:
        raise ConfigError(f"model.pretrained ({config.pretrained!r}) and model.backbone_weights "
                          f"({config.backbone_weights!r}) both name starting weights; keep one")
