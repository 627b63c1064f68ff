"""Inference backends: run one exported tower (ONNX) on a batch and return its outputs.

Two implementations behind one small interface (:class:`Backend`):

- ``"onnxruntime"`` (:mod:`.onnxruntime_backend`): CPU everywhere, CUDA where the
  ``onnxruntime-gpu`` build and a GPU are present.
- ``"tensorrt"`` (:mod:`.tensorrt_backend`): TensorRT 10+ engines built from the ONNX file on
  first use and cached; needs the ``tensorrt`` and ``cuda-python`` packages and a GPU.

``"auto"`` takes TensorRT when the device is a GPU and TensorRT can run there, else
onnxruntime. Heavy imports happen here only when a backend is made, never at
``import cmhash``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from ..bundle import ONNXRUNTIME_ONLY_VARIANTS
from ..errors import BackendUnavailableError

BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class ModelSpec:
    """What the manifest promises about one model: the one input and the output we read."""

    what: str  # for messages, e.g. "image model image.onnx"
    input_name: str
    input_shape: tuple  # ("batch", 3, 224, 224)
    output_name: str
    bits: int


class Backend(abc.ABC):
    """Runs one model. ``run`` takes float32 (N, ...) matching the input spec and returns
    float32 (N, bits)."""

    name: str = ""

    @abc.abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:
        """Free what the backend holds (sessions, GPU memory)."""


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'cuda' -> ('cuda', 0); 'cuda:1' -> ('cuda', 1); 'auto' kept."""
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'cpu', 'cuda', 'cuda:1' or 'auto', got {device!r}")
    if device in ("cpu", "auto"):
        return device, 0
    kind, _, index = device.partition(":")
    if kind == "cuda" and (index == "" or index.isdigit()):
        return "cuda", int(index or 0)
    raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:<index>' or 'auto'")


def gpu_available() -> bool:
    """A CUDA GPU that onnxruntime or TensorRT could use is present."""
    from .onnxruntime_backend import cuda_provider_available
    from .tensorrt_backend import tensorrt_available

    return cuda_provider_available() or tensorrt_available()[0]


def create_backend(
    kind: str,
    model: bytes,
    spec: ModelSpec,
    *,
    device: str = "cpu",
    threads: int | None = None,
    variant: str = "fp32",
    **options,
) -> Backend:
    """Make a backend for one model.

    Args:
        kind: ``"auto"``, ``"onnxruntime"`` or ``"tensorrt"``.
        model: the ONNX file's bytes (verified by the bundle loader).
        spec: what the manifest says the model takes and gives.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:<i>"`` or ``"auto"`` (a GPU when one is usable).
        threads: CPU threads for onnxruntime (``intra_op_num_threads``); ``None``: its default.
        variant: the bundle variant the model is (``"fp32"``, ``"fp16"``, ``"int8"``,
            ``"int8-dynamic"``: onnxruntime only, also with ``kind="auto"``). A reduced
            precision file carries its own types (fp16 casts, Q/DQ), so TensorRT builds it
            strongly typed (``precision="model"``) unless told otherwise.
        options: backend-specific (TensorRT: ``precision``, ``cache_dir``, ``max_batch``).
    """
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    device_kind, device_index = parse_device(device)
    if device_kind == "auto":
        device_kind = "cuda" if gpu_available() else "cpu"
    if kind == "auto":
        from .tensorrt_backend import tensorrt_available

        usable = device_kind == "cuda" and variant not in ONNXRUNTIME_ONLY_VARIANTS
        kind = "tensorrt" if usable and tensorrt_available()[0] else "onnxruntime"
    if kind == "tensorrt":
        if device_kind != "cuda":
            raise BackendUnavailableError("the TensorRT backend runs on a GPU; pass device='cuda'")
        from .tensorrt_backend import TensorRTBackend

        if variant in ONNXRUNTIME_ONLY_VARIANTS:
            raise BackendUnavailableError(
                "the int8-dynamic variant runs on onnxruntime only (onnxruntime operators, dynamic "
                "quantisation); TensorRT takes the QDQ 'int8' variant")
        if variant != "fp32":
            options.setdefault("precision", "model")
        return TensorRTBackend(model, spec, device_index=device_index, **options)
    if options:
        raise TypeError(f"onnxruntime takes no options {sorted(options)}")
    from .onnxruntime_backend import OnnxRuntimeBackend

    # onnxruntime 1.32's NCHWc layout pass crashes (SIGSEGV) on some float16 graphs with convolutions;
    # float16 on a CPU gains nothing from it anyway.
    disabled = ["NchwcTransformer"] if variant == "fp16" else []
    return OnnxRuntimeBackend(model, spec, device=device_kind, device_index=device_index, threads=threads,
                              disabled_optimizers=disabled)
