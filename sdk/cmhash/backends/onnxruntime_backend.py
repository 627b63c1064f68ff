"""The onnxruntime backend: an InferenceSession per model, checked against the manifest.

Execution providers. ``providers`` lists onnxruntime's providers in priority order, each a
name (``"OpenVINOExecutionProvider"``, or the short ``"openvino"``) or a ``(name, options)``
pair whose options onnxruntime's provider takes as they are; the CPU provider is appended
as the fallback for operators the others do not take. A provider this onnxruntime lacks is
a :class:`~cmhash.errors.ProviderUnavailableError` naming the package that has it, unless
``allow_fallback``: then it is left out (with a warning) and :attr:`providers` says what
runs. :data:`PROVIDERS` is the table of names and packages.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..cpus import available_cpus
from ..errors import (
    ArgumentTypeError,
    BackendUnavailableError,
    BundleError,
    InvalidArgumentError,
    ModelSignatureError,
    ProviderUnavailableError,
)
from .base import Backend, ModelSpec

CPU = "CPUExecutionProvider"
# short name -> (onnxruntime's provider name, where to get an onnxruntime that has it)
PROVIDERS: dict[str, tuple[str, str]] = {
    "cpu": (CPU, "pip install onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "pip install onnxruntime-gpu (and CUDA, cuDNN)"),
    "tensorrt": ("TensorrtExecutionProvider", "pip install onnxruntime-gpu (and the TensorRT libraries)"),
    "openvino": ("OpenVINOExecutionProvider", "pip install onnxruntime-openvino"),
    "directml": ("DmlExecutionProvider", "pip install onnxruntime-directml (Windows)"),
    "rocm": ("ROCMExecutionProvider", "pip install onnxruntime-rocm (AMD's wheel for your ROCm version)"),
    "migraphx": ("MIGraphXExecutionProvider", "pip install onnxruntime-migraphx"),
    "qnn": ("QNNExecutionProvider", "pip install onnxruntime-qnn (Windows on Snapdragon)"),
    "coreml": ("CoreMLExecutionProvider", "pip install onnxruntime on macOS (its wheels include CoreML)"),
    "xnnpack": ("XnnpackExecutionProvider",
                "the onnxruntime-android / onnxruntime-objc packages, or onnxruntime built with --use_xnnpack"),
    "nnapi": ("NnapiExecutionProvider", "the onnxruntime-android package (Android only)"),
}
_BY_NAME = {full: short for short, (full, _) in PROVIDERS.items()}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(
            "the onnxruntime backend needs the onnxruntime package: pip install onnxruntime "
            "(or onnxruntime-gpu for CUDA)"
        ) from exc
    return onnxruntime


def available_providers() -> list[str]:
    """The execution providers this machine's onnxruntime offers, in its priority order
    (``[]`` without onnxruntime)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def cuda_provider_available() -> bool:
    return "CUDAExecutionProvider" in available_providers()


def provider_name(name: str) -> str:
    """onnxruntime's name of a provider given by its own or its short name."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"a provider is a name or a (name, options) pair, got {name!r}")
    if name in _BY_NAME or name.endswith("ExecutionProvider"):
        return name
    if name.lower() in PROVIDERS:
        return PROVIDERS[name.lower()][0]
    raise InvalidArgumentError(f"unknown execution provider {name!r}; use onnxruntime's name "
                               f"(e.g. 'OpenVINOExecutionProvider') or one of {', '.join(PROVIDERS)}")


def resolve_providers(providers, allow_fallback: bool = False) -> list[tuple[str, dict]]:
    """``providers`` (names or (name, options) pairs, priority order) -> onnxruntime's
    ``(name, options)`` list with the CPU provider last. Raises
    :class:`ProviderUnavailableError` for one this onnxruntime lacks, unless ``allow_fallback``."""
    if isinstance(providers, (str, tuple)):
        providers = [providers]
    offered = available_providers()
    chosen: list[tuple[str, dict]] = []
    for item in providers:
        name, options = (item if isinstance(item, tuple) and len(item) == 2 else (item, {}))
        name = provider_name(name)
        if not isinstance(options, dict):
            raise ArgumentTypeError(f"the options of {name} must be a dict, got {options!r}")
        if name not in offered:
            hint = PROVIDERS.get(_BY_NAME.get(name, ""), ("", "an onnxruntime build that includes it"))[1]
            message = (f"{name} is not in this onnxruntime (it offers {', '.join(offered) or 'nothing'}); "
                       f"it comes with: {hint}")
            if not allow_fallback:
                raise ProviderUnavailableError(message + "; or pass allow_fallback=True to run on what is there",
                                               provider=name)
            warnings.warn(f"{message}; falling back to the next provider", RuntimeWarning, stacklevel=4)
            continue
        if name not in (n for n, _ in chosen):
            chosen.append((name, {str(k): str(v) for k, v in options.items()}))
    if CPU not in (n for n, _ in chosen):
        chosen.append((CPU, {}))
    return chosen


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    devices = ("cpu", "cuda")
    options = ("providers", "allow_fallback", "model_format")
    install_hint = "pip install onnxruntime (or onnxruntime-gpu for CUDA)"

    @classmethod
    def available(cls, device: str = "cpu") -> tuple[bool, str]:
        try:
            import onnxruntime
        except ImportError as exc:
            return False, f"onnxruntime does not import ({exc}); {cls.install_hint}"
        if device.startswith("cuda") and not cuda_provider_available():
            return False, "this onnxruntime has no CUDA provider; pip install onnxruntime-gpu"
        return True, f"onnxruntime {onnxruntime.__version__}"

    @classmethod
    def create(cls, model, spec, *, device, device_index, threads, variant, **options):
        # onnxruntime 1.32's NCHWc layout pass crashes (SIGSEGV) on some float16 graphs with
        # convolutions; float16 on a CPU gains nothing from it anyway.
        disabled = ["NchwcTransformer"] if variant == "fp16" else []
        return cls(model, spec, device=device, device_index=device_index, threads=threads, disabled_optimizers=disabled,
                   **options)

    def __init__(
        self,
        model: bytes,
        spec: ModelSpec,
        *,
        device: str = "cpu",
        device_index: int = 0,
        threads: int | None = None,
        disabled_optimizers: list[str] | None = None,
        providers=None,
        allow_fallback: bool = False,
        model_format: str = "onnx",
    ):
        ort = _onnxruntime()
        self.spec = spec
        if providers is not None:
            if device != "cpu":
                raise InvalidArgumentError(f"give providers or device={device!r}, not both: the providers choose "
                                           "where the model runs (e.g. providers=['cuda'])")
            chosen = resolve_providers(providers, allow_fallback)
        elif device == "cuda":
            if not cuda_provider_available():
                raise ProviderUnavailableError(
                    f"device 'cuda' asked for, but this onnxruntime has no CUDA provider (it has "
                    f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use device='cpu'",
                    provider="CUDAExecutionProvider")
            chosen = [("CUDAExecutionProvider", {"device_id": str(device_index)}), (CPU, {})]
        elif device == "cpu":
            chosen = [(CPU, {})]
        else:
            raise InvalidArgumentError(f"onnxruntime runs on 'cpu' or 'cuda', got {device!r}")
        options = ort.SessionOptions()
        if threads is not None:
            if not isinstance(threads, int) or isinstance(threads, bool):
                raise ArgumentTypeError(f"threads must be a positive int or None, got {threads!r}")
            if threads < 1:
                raise InvalidArgumentError(f"threads must be a positive int or None, got {threads!r}")
        # onnxruntime's default is one thread per physical core of the machine, whatever this
        # process may use; waiting threads sleep, so a busy machine is shared, not fought over
        options.intra_op_num_threads = self.threads = threads or available_cpus()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if model_format == "ort":
            # the file's graph is already optimised to the portable level it was saved at
            # (cmhash.export.ort); onnxruntime runs it without optimising it again
            options.add_session_config_entry("session.load_model_format", "ORT")
        elif model_format != "onnx":
            raise InvalidArgumentError(f"model_format must be 'onnx' or 'ort', got {model_format!r}")
        self.model_format = model_format
        options.log_severity_level = 3  # errors only; warnings about unused initialisers are noise here
        try:
            extra = {"disabled_optimizers": disabled_optimizers} if disabled_optimizers else {}
            self.session = ort.InferenceSession(model, sess_options=options, providers=[n for n, _ in chosen],
                                                provider_options=[o for _, o in chosen], **extra)
        except Exception as exc:  # InvalidProtobuf, Fail, NotImplemented...: all mean a bad model file
            raise BundleError(f"{spec.what} is not a model onnxruntime can load: {exc}") from exc
        self.device = device
        # what onnxruntime actually registered: a provider that failed to start is missing here
        self.providers = self.session.get_providers()
        missing = [n for n, _ in chosen if n not in self.providers]
        if missing and not allow_fallback:
            raise ProviderUnavailableError(
                f"onnxruntime could not start {', '.join(missing)} for {spec.what} (it runs on "
                f"{', '.join(self.providers)}); check the provider's libraries and options, or pass "
                "allow_fallback=True", provider=missing[0])
        check_signature(self.session, spec)

    def run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.spec.output_name], {self.spec.input_name: batch})
        return out

    def close(self) -> None:
        self.session = None


def _describe(arg) -> str:
    return f"{arg.name} {arg.type} {list(arg.shape)}"


def check_signature(session, spec: ModelSpec) -> None:
    """The model's one input and the named output agree with the manifest, or
    :class:`ModelSignatureError` says how they differ."""
    inputs = session.get_inputs()
    expected = f"{spec.input_name} tensor(float) {list(spec.input_shape)}"
    if len(inputs) != 1:
        raise ModelSignatureError(
            f"{spec.what} has {len(inputs)} inputs ({'; '.join(_describe(i) for i in inputs)}); "
            f"the manifest describes one: {expected}"
        )
    (arg,) = inputs
    problems = []
    if arg.name != spec.input_name:
        problems.append(f"its input is named {arg.name!r}, the manifest says {spec.input_name!r}")
    if arg.type != "tensor(float)":
        problems.append(f"its input is {arg.type}, the manifest says float32")
    if len(arg.shape) != len(spec.input_shape):
        problems.append(f"its input has rank {len(arg.shape)}, the manifest says {len(spec.input_shape)}")
    else:
        if isinstance(arg.shape[0], int):
            problems.append(f"its batch axis is fixed at {arg.shape[0]}; export it with a dynamic batch axis")
        for axis, (got, want) in enumerate(zip(arg.shape[1:], spec.input_shape[1:]), start=1):
            if isinstance(got, int) and got != want:
                problems.append(f"input axis {axis} is {got}, the manifest says {want}")
    outputs = {o.name: o for o in session.get_outputs()}
    out = outputs.get(spec.output_name)
    if out is None:
        problems.append(f"it has no output {spec.output_name!r} (outputs: {', '.join(outputs)})")
    else:
        if out.type != "tensor(float)":
            problems.append(f"output {out.name!r} is {out.type}, not float32")
        if len(out.shape) != 2:
            problems.append(f"output {out.name!r} has rank {len(out.shape)}, not 2 (batch, bits)")
        elif isinstance(out.shape[1], int) and out.shape[1] != spec.bits:
            problems.append(f"output {out.name!r} has {out.shape[1]} values per item, the manifest says bits={spec.bits}")
    if problems:
        raise ModelSignatureError(
            f"{spec.what} does not match the manifest: {'; '.join(problems)}. Model input: {_describe(arg)}; "
            f"manifest: {expected}"
        )
