"""Export of trained towers to ONNX bundles, with fp16/int8 variants, TensorRT engines and
verification against PyTorch (needs the ``export`` extra: torch, onnx).

    from cmhash.export import export_checkpoint
    report = export_checkpoint("runs/egath/best", "bundle/", int8=True, verify_data="photos/")

The names below are imported on first use, so that ``cmhash.export.cli`` (which the
``cmhash`` command loads to list its commands) is importable without torch.
"""

import importlib
import warnings

from cmhash.cpus import quiet_openmp_waits
from cmhash.errors import ExportError, VerificationError

quiet_openmp_waits()  # before any module here imports torch and its OpenMP runtime

# name -> the submodule that defines it
_NAMES = {
    "export_checkpoint": "api",
    "DEFAULT_BIT_FLOOR": "api",
    "keep_passing": "api",
    "Trained": "loading",
    "export_tower": "onnx_export",
    "OPSET": "onnx_export",
    "to_fp16": "variants",
    "quantize_int8": "variants",
    "quantize_int8_dynamic": "variants",
    "float_nodes": "variants",
}

__all__ = [*_NAMES, "ExportError", "VerificationError"]


def __getattr__(name: str):
    if name == "load_trained":  # kept for one release
        warnings.warn("cmhash.export.load_trained is now cmhash.export.Trained.load", DeprecationWarning, stacklevel=2)
        return importlib.import_module(".loading", __name__).Trained.load
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
