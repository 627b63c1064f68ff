"""The onnxruntime backend: an InferenceSession per model, checked against the manifest."""

from __future__ import annotations

import numpy as np

from ..cpus import available_cpus
from ..errors import ArgumentTypeError, BackendUnavailableError, BundleError, InvalidArgumentError, ModelSignatureError
from .base import Backend, ModelSpec


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(
            "the onnxruntime backend needs the onnxruntime package: pip install onnxruntime "
            "(or onnxruntime-gpu for CUDA)"
        ) from exc
    return onnxruntime


def cuda_provider_available() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    devices = ("cpu", "cuda")
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
        return cls(model, spec, device=device, device_index=device_index, threads=threads, disabled_optimizers=disabled)

    def __init__(
        self,
        model: bytes,
        spec: ModelSpec,
        *,
        device: str = "cpu",
        device_index: int = 0,
        threads: int | None = None,
        disabled_optimizers: list[str] | None = None,
    ):
        ort = _onnxruntime()
        self.spec = spec
        if device == "cuda":
            if not cuda_provider_available():
                raise BackendUnavailableError(
                    f"device 'cuda' asked for, but this onnxruntime has no CUDA provider (it has "
                    f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use device='cpu'"
                )
            providers = [("CUDAExecutionProvider", {"device_id": device_index}), "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
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
        options.intra_op_num_threads = threads or available_cpus()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only; warnings about unused initialisers are noise here
        try:
            extra = {"disabled_optimizers": disabled_optimizers} if disabled_optimizers else {}
            self.session = ort.InferenceSession(model, sess_options=options, providers=providers, **extra)
        except Exception as exc:  # InvalidProtobuf, Fail, NotImplemented...: all mean a bad model file
            raise BundleError(f"{spec.what} is not a model onnxruntime can load: {exc}") from exc
        self.device = device
        self.providers = self.session.get_providers()
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
