"""Inference backends: run one exported tower (ONNX) on a batch and return its outputs.

The registry below lists every backend, in the order ``"auto"`` prefers them. Each is one
module holding a :class:`Backend` subclass that declares its capabilities (name, devices,
the bundle variants it runs, its options, an availability check); the encoder, the
command line, the benchmark and the export all ask this registry, never a backend by name.

- ``"tensorrt"`` (:mod:`.tensorrt_backend`): TensorRT 10+ engines built from the ONNX file on
  first use and cached; needs the ``tensorrt`` and ``cuda-python`` packages and a GPU.
- ``"onnxruntime"`` (:mod:`.onnxruntime_backend`): CPU everywhere, CUDA where the
  ``onnxruntime-gpu`` build and a GPU are present, and any other execution provider of the
  installed onnxruntime through its ``providers`` option.

``"auto"`` takes the first backend that runs the variant on the device and is available
here. Heavy imports (onnxruntime, tensorrt) happen only when a backend is made or checked,
never at ``import cmhash``.

Adding a backend: write ``<name>_backend.py`` with a :class:`Backend` subclass and add the
class to :data:`REGISTRY`.
"""

from __future__ import annotations

from ..errors import ArgumentTypeError, BackendUnavailableError, InvalidArgumentError
from ..bundle import VARIANTS
from .base import Backend, ModelSpec, parse_device
from .onnxruntime_backend import PROVIDERS, OnnxRuntimeBackend, available_providers
from .tensorrt_backend import TensorRTBackend

REGISTRY: dict[str, type[Backend]] = {cls.name: cls for cls in (TensorRTBackend, OnnxRuntimeBackend)}
BACKENDS = ("auto", *REGISTRY)  # what a user may ask for
DEVICE_WORDS = {"cpu": "the CPU ('cpu')", "cuda": "a GPU ('cuda')"}

__all__ = ["REGISTRY", "BACKENDS", "PROVIDERS", "Backend", "ModelSpec", "available_providers", "backend_class",
           "backends_for", "create_backend",
           "default_device", "gpu_available", "parse_device"]


def backend_class(name: str) -> type[Backend]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown backend {name!r}; choose one of {', '.join(['auto', *REGISTRY])}") from None


def backends_for(variant: str = "fp32", device: str | None = None, *, available: bool = False) -> list[str]:
    """Names of the backends that run ``variant`` (on ``device``'s kind, when given), in
    preference order; with ``available``, only those that can run here now."""
    kind = None if device is None else parse_device(device)[0]
    names = []
    for name, cls in REGISTRY.items():
        if variant not in cls.variants or (kind not in (None, "auto") and kind not in cls.devices):
            continue
        if available and not cls.available(device if kind not in (None, "auto") else cls.devices[0])[0]:
            continue
        names.append(name)
    return names


def default_device(name: str, requested: str = "cpu") -> str:
    """``requested`` when backend ``name`` runs there, else its preferred device (a GPU
    backend benchmarked beside a CPU one)."""
    cls = backend_class(name)
    return requested if parse_device(requested)[0] in (*cls.devices, "auto") else cls.devices[0]


def gpu_available() -> bool:
    """A CUDA GPU that some backend could use is present."""
    return any(cls.available("cuda")[0] for cls in REGISTRY.values() if "cuda" in cls.devices)


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
        kind: ``"auto"`` or a name in :data:`REGISTRY` (``"onnxruntime"``, ``"tensorrt"``).
        model: the ONNX file's bytes (verified by the bundle loader).
        spec: what the manifest says the model takes and gives.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:<i>"`` or ``"auto"`` (a GPU when one is usable).
        threads: CPU threads for onnxruntime (``intra_op_num_threads``); ``None``: the CPUs this process may use (:func:`cmhash.cpus.available_cpus`).
        variant: the bundle variant the model is (``"fp32"``, ``"fp16"``, ``"int8"``,
            ``"int8-dynamic"``); ``"auto"`` takes a backend that runs it.
        options: backend-specific (each backend's ``options``; TensorRT: ``precision``,
            ``cache_dir``, ``max_batch``; onnxruntime: ``providers``, ``allow_fallback``,
            ``model_format``).
    """
    if kind != "auto":
        backend_class(kind)  # an unknown name: the error lists the registry
    if variant not in VARIANTS:
        raise InvalidArgumentError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    device_kind, device_index = parse_device(device)
    if device_kind == "auto":
        device_kind = "cuda" if gpu_available() else "cpu"
    if kind == "auto":  # the first that runs here and takes the options given (providers: onnxruntime)
        usable = [k for k in backends_for(variant, device_kind, available=True) if set(options) <= set(REGISTRY[k].options)]
        kind = usable[0] if usable else "onnxruntime"  # onnxruntime then says what is missing
    cls = REGISTRY[kind]
    if device_kind not in cls.devices:
        raise BackendUnavailableError(
            f"the {kind} backend runs on {' or '.join(DEVICE_WORDS[d] for d in cls.devices)}, not on "
            f"{DEVICE_WORDS[device_kind]}; pass device='{cls.devices[0]}' or another backend "
            f"({', '.join(backends_for(variant, device_kind)) or 'none'})")
    if variant not in cls.variants:
        raise BackendUnavailableError(
            f"the {variant} variant does not run on {kind} (it runs on "
            f"{', '.join(backends_for(variant)) or 'no backend'}); {kind} takes {', '.join(cls.variants)}")
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ArgumentTypeError(f"{kind} takes no options {unknown}" + (f" (it takes {list(cls.options)})" if cls.options else ""))
    return cls.create(model, spec, device=device_kind, device_index=device_index, threads=threads, variant=variant,
                      **options)
