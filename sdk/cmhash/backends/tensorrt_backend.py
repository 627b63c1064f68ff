"""The TensorRT backend, written against TensorRT 10's Python API (and 11, where it differs).

The ONNX file stays the distributable artefact: engines are not portable across GPU
models, platforms or TensorRT versions, so a plan is built on the target machine on first
use and cached under a key of (model sha256, GPU name and compute capability, TensorRT
version, precision, batch profile). A cached plan that fails to deserialise is rebuilt.
The cache is trusted local state (a plan is GPU code, not data): keep it in a directory
only you write to (``cache_dir``, ``$CMHASH_CACHE_DIR`` or ``~/.cache/cmhash/tensorrt``).

Precision: ``"fp32"`` (default); ``"fp16"`` through ``BuilderFlag.FP16`` on TensorRT 10
(TensorRT 11 removed the precision builder flags: export an fp16 or Q/DQ-quantised ONNX and
use ``"model"``); ``"model"`` builds a strongly typed network that runs in the types the
ONNX file itself declares (explicit Q/DQ, fp16 casts).

Device memory goes through the CUDA runtime of ``cuda-python`` (no torch, no pycuda).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import BackendError, BackendUnavailableError, BundleError, InvalidArgumentError, ModelSignatureError
from .base import Backend, ModelSpec

PRECISIONS = ("fp32", "fp16", "model")
DEFAULT_MAX_BATCH = 64
WORKSPACE_BYTES = 1 << 30


def _import_tensorrt():
    import tensorrt

    return tensorrt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when tensorrt and the CUDA runtime import and a GPU is present,
    else (False, the reason)."""
    try:
        trt = _import_tensorrt()
    except Exception as exc:  # ImportError, or a broken install raising OSError on its libraries
        return False, f"tensorrt does not import ({exc}); pip install tensorrt"
    try:
        cudart = _import_cudart()
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:
        return False, f"the CUDA runtime of cuda-python is not usable ({exc}); pip install cuda-python"
    if int(err) != 0 or count == 0:
        return False, "no CUDA GPU is present"
    return True, trt.__version__


def default_precision(variant: str) -> str:
    """The precision a bundle variant is built in: fp32 as is; the fp16 and int8 files carry
    their own types (fp16 casts, explicit Q/DQ), so they are built strongly typed, which
    TensorRT 10 and 11 both support (11 has no FP16/INT8 builder flags)."""
    return "fp32" if variant == "fp32" else "model"


def builder_settings(trt_major: int, precision: str) -> dict:
    """How to ask TensorRT ``trt_major`` for ``precision``: builder flags (by name) and
    whether the network is strongly typed. Pure, so it is tested without a GPU."""
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if trt_major < 10:
        raise BackendUnavailableError(f"TensorRT {trt_major} is too old; cmhash needs TensorRT 10 or newer")
    if precision == "model":
        return {"flags": [], "strongly_typed": True}
    if precision == "fp16":
        if trt_major >= 11:
            raise InvalidArgumentError(
                "TensorRT 11 removed the FP16 builder flag: export an fp16 (or Q/DQ-quantised) ONNX "
                "model and use precision='model'"
            )
        return {"flags": ["FP16"], "strongly_typed": False}
    # fp32: TensorRT 10 builds fp32 by default; 11 takes the types from a strongly typed network
    return {"flags": [], "strongly_typed": trt_major >= 11}


def cache_key(model_sha256: str, gpu: str, trt_version: str, precision: str, input_shape, max_batch: int) -> str:
    fields = {
        "model": model_sha256,
        "gpu": gpu,
        "tensorrt": trt_version,
        "precision": precision,
        "input": [str(d) for d in input_shape],
        "max_batch": max_batch,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("CMHASH_CACHE_DIR") or Path.home() / ".cache" / "cmhash") / "tensorrt"


class _Cuda:
    """The few CUDA runtime calls the backend needs, raising on error codes."""

    def __init__(self, device_index: int):
        self.rt = _import_cudart()
        self.check(self.rt.cudaSetDevice(device_index), "cudaSetDevice")
        props = self.check(self.rt.cudaGetDeviceProperties(device_index), "cudaGetDeviceProperties")
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        self.gpu = f"{name.strip(chr(0))} sm_{props.major}{props.minor}"
        self.stream = self.check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def check(self, result, call: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise BackendError(f"{call} failed with CUDA error {int(err)}")
        return rest[0] if len(rest) == 1 else (tuple(rest) or None)

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr), "cudaFree")

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def synchronize(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


class TensorRTBackend(Backend):
    name = "tensorrt"
    devices = ("cuda",)
    # int8-dynamic holds onnxruntime (com.microsoft) operators and dynamic quantisation,
    # which TensorRT does not read; the QDQ "int8" is TensorRT's.
    variants = ("fp32", "fp16", "int8")
    options = ("precision", "cache_dir", "max_batch")
    exact_fp32 = False  # TensorRT may run fp32 layers in TF32: bits are its fp32 contract
    install_hint = "pip install tensorrt cuda-python (and a CUDA GPU)"

    @classmethod
    def available(cls, device: str = "cuda") -> tuple[bool, str]:
        return tensorrt_available()

    @classmethod
    def create(cls, model, spec, *, device, device_index, threads, variant, **options):
        options.setdefault("precision", default_precision(variant))
        return cls(model, spec, device_index=device_index, **options)

    def __init__(
        self,
        model: bytes,
        spec: ModelSpec,
        *,
        device_index: int = 0,
        precision: str = "fp32",
        cache_dir: str | os.PathLike | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ):
        ok, reason = tensorrt_available()
        if not ok:
            raise BackendUnavailableError(f"the TensorRT backend cannot run here: {reason}")
        self.trt = _import_tensorrt()
        self.spec = spec
        self.max_batch = int(max_batch)
        self.settings = builder_settings(int(self.trt.__version__.split(".")[0]), precision)
        self.cuda = _Cuda(device_index)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        key = cache_key(
            hashlib.sha256(model).hexdigest(), self.cuda.gpu, self.trt.__version__, precision, spec.input_shape, self.max_batch
        )
        plan_path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        plan_path = plan_path / f"{key}.plan"
        self.engine = self._load_plan(plan_path) if plan_path.exists() else None
        if self.engine is None:
            plan = self._build_plan(model)
            _write_atomic(plan_path, plan)
            self.engine = self.trt.Runtime(self.logger).deserialize_cuda_engine(plan)
            if self.engine is None:
                raise BackendError(f"TensorRT could not load the engine it just built for {spec.what}")
        self._check_engine()
        self.context = self.engine.create_execution_context()
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _load_plan(self, path: Path):
        # None when the plan is from another TensorRT or GPU: rebuilt then (no preflight API exists).
        return self.trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())

    def _build_plan(self, model: bytes) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        flags = 0  # explicit batch is the only mode since TensorRT 10
        if self.settings["strongly_typed"]:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(model):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BundleError(f"TensorRT cannot parse {self.spec.what}: {errors}")
        if network.num_inputs != 1 or network.get_input(0).name != self.spec.input_name:
            names = [network.get_input(i).name for i in range(network.num_inputs)]
            raise ModelSignatureError(
                f"{self.spec.what} has inputs {names}; the manifest describes one, {self.spec.input_name!r}"
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        for flag in self.settings["flags"]:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        rest = tuple(self.spec.input_shape[1:])
        profile = builder.create_optimization_profile()
        profile.set_shape(self.spec.input_name, (1, *rest), (min(32, self.max_batch), *rest), (self.max_batch, *rest))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError(f"TensorRT failed to build an engine for {self.spec.what}; see its log above")
        return bytes(plan)

    def _check_engine(self) -> None:
        trt, engine, spec = self.trt, self.engine, self.spec
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [spec.input_name] or spec.output_name not in names:
            raise ModelSignatureError(
                f"{spec.what}: engine tensors {names} do not match the manifest "
                f"(input {spec.input_name!r}, output {spec.output_name!r})"
            )
        for name in (spec.input_name, spec.output_name):
            if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise ModelSignatureError(f"{spec.what}: tensor {name!r} is {engine.get_tensor_dtype(name)}, not float32")

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr, size = self.cuda.malloc(nbytes), nbytes
            self._buffers[name] = (ptr, size)
        return ptr

    def run(self, batch: np.ndarray) -> np.ndarray:
        outputs = [self._run(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        return np.concatenate(outputs) if outputs else np.zeros((0, self.spec.bits), np.float32)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        spec = self.spec
        self.context.set_input_shape(spec.input_name, batch.shape)
        out = np.empty(tuple(self.context.get_tensor_shape(spec.output_name)), dtype=np.float32)
        d_in = self._buffer(spec.input_name, batch.nbytes)
        d_out = self._buffer(spec.output_name, out.nbytes)
        self.context.set_tensor_address(spec.input_name, d_in)
        self.context.set_tensor_address(spec.output_name, d_out)
        self.cuda.to_device(d_in, batch)
        if not self.context.execute_async_v3(int(self.cuda.stream)):
            raise BackendError(f"TensorRT failed to run {spec.what}")
        self.cuda.to_host(out, d_out)
        self.cuda.synchronize()
        return out

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cuda.free(ptr)
        self._buffers.clear()
        self.context = None
        self.engine = None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
