"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint is a directory::

    model.safetensors   every module's state_dict, keys "<module name>.<parameter name>"
    state.safetensors   "method/<name>"    the method's state tensors (B, banks, scalars)
                        "optim/<name>/..." optimiser state tensors (Adam moments, steps)
                        "sched/<name>/..." scheduler tensors, if any
                        "scaler/..."       the fp16 GradScaler's tensors, if any
    checkpoint.json     format and versions, config, method name, epoch, global step,
                        metrics history, best result, label names, vocabulary, the
                        pretrained weights the backbone started from ("pretrained":
                        library, model, tag, file, sha256; null from scratch), the
                        non-tensor parts of optimiser / scheduler / scaler states (with
                        {"__tensor__": key} where a tensor was), sha256 of both files.

Optimiser and scheduler ``state_dict``s are nested dicts/lists with int keys, tuples and
tensors; :func:`flatten` turns them into JSON plus a tensor dict and :func:`unflatten` gives
back an equal structure, so ``load_state_dict`` sees exactly what ``state_dict`` gave.
Anything else (an arbitrary object) is a :class:`CheckpointError`, never a pickle.

Writes are atomic: the new checkpoint is written and fsynced in ``<name>.tmp``, the old
directory is renamed to ``<name>.old``, the new one renamed into place, the old one
removed. A crash before the first rename leaves the old checkpoint untouched; a crash
between the two renames leaves ``<name>.old`` complete, which :func:`resolve` falls back to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cmhash.files import fsync
from cmhash.errors import CmhashError

FORMAT = "cmhash-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
META_FILE = "checkpoint.json"


class CheckpointError(CmhashError, ValueError):
    """A checkpoint that cannot be written or read (missing, corrupted, other format)."""


# --------------------------------------------------------------------------- flatten / unflatten

_MARKERS = ("__tensor__", "__tuple__", "__dict__")


def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of ``obj``; its tensors go into ``tensors`` under keys starting with ``prefix``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise CheckpointError(f"cannot store a dict key of type {type(key).__name__} at {prefix!r}")
        if all(isinstance(key, str) and key not in _MARKERS for key in obj):
            return {key: flatten(value, f"{prefix}/{key}", tensors) for key, value in obj.items()}
        # JSON keys are strings: keep (key, value) pairs so int keys (optimizer state) survive.
        return {"__dict__": [[key, flatten(value, f"{prefix}/{key}", tensors)] for key, value in obj.items()]}
    raise CheckpointError(
        f"cannot store a {type(obj).__module__}.{type(obj).__name__} at {prefix!r} without pickle; "
        "keep state as tensors, numbers, strings, lists and dicts"
    )


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            try:
                return tensors[obj["__tensor__"]]
            except KeyError:
                raise CheckpointError(f"tensor {obj['__tensor__']!r} is missing from {STATE_FILE}") from None
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {key: unflatten(value, tensors) for key, value in obj["__dict__"]}
        return {key: unflatten(value, tensors) for key, value in obj.items()}
    return obj


# --------------------------------------------------------------------------- save / load


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors on CPU, metadata as written."""

    path: Path
    model: dict[str, torch.Tensor]  # "<module>.<param>" -> tensor
    state: dict[str, torch.Tensor]  # everything in state.safetensors
    meta: dict[str, Any]  # checkpoint.json

    def module_state(self, name: str) -> dict[str, torch.Tensor]:
        """The state_dict of module ``name``."""
        prefix = f"{name}."
        return {k[len(prefix):]: v for k, v in self.model.items() if k.startswith(prefix)}

    def method_state(self) -> dict[str, torch.Tensor]:
        return {k[len("method/"):]: v for k, v in self.state.items() if k.startswith("method/")}

    def restore(self, key: str) -> Any:
        """An optimiser / scheduler / scaler state_dict stored under ``meta[key]`` (e.g. 'optimizers')."""
        return unflatten(self.meta[key], self.state)


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        elif t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        t = t.contiguous()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(
    path: str | Path,
    model: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> Path:
    """Atomically write (or replace) the checkpoint directory ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from an interrupted write
    tmp.mkdir()
    save_file(_storable(model), str(tmp / MODEL_FILE))
    save_file(_storable(state), str(tmp / STATE_FILE))
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION)
    meta["sha256"] = {name: _sha256(tmp / name) for name in (MODEL_FILE, STATE_FILE)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1, allow_nan=True))
    for name in (MODEL_FILE, STATE_FILE, META_FILE):
        fsync(tmp / name)
    fsync(tmp)

    if path.exists():  # complete (only ever made by the rename below): keep it as the fallback
        if old.exists():
            shutil.rmtree(old)
        os.rename(path, old)
    os.rename(tmp, path)
    fsync(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


def resolve(path: str | Path) -> Path:
    """The directory to read for checkpoint ``path``: itself, or ``<path>.old`` after a crash mid-replace."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    old = path.with_name(path.name + ".old")
    if not path.exists() and (old / META_FILE).is_file():
        return old
    raise CheckpointError(f"no checkpoint at {str(path)!r} (expected {META_FILE}, {MODEL_FILE} and {STATE_FILE})")


def exists(path: str | Path) -> bool:
    try:
        resolve(path)
    except CheckpointError:
        return False
    return True


def read_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Load a checkpoint directory (tensors on CPU). ``verify`` checks the sha256 of both files."""
    path = resolve(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / META_FILE} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cmhash checkpoint (format={meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta['format_version']}; this cmhash reads up to {FORMAT_VERSION}"
        )
    if verify:
        for name, expected in meta.get("sha256", {}).items():
            if _sha256(path / name) != expected:
                raise CheckpointError(f"{path / name} does not match the sha256 in {META_FILE}: corrupted or edited")
    try:
        model = load_file(str(path / MODEL_FILE))
        state = load_file(str(path / STATE_FILE))
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError for I/O
        raise CheckpointError(f"cannot read the tensors of {path}: {exc}") from exc
    return Checkpoint(path=path, model=model, state=state, meta=meta)
