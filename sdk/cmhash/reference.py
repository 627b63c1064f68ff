"""Reference inputs a bundle carries, and the check that a machine reproduces their codes.

At export, a bundle stores for each modality a few preprocessed inputs and the tanh
outputs PyTorch gave for them (``reference/<modality>.npz``, listed and checksummed in the
manifest like every model file), together with the contract its variants were verified
against. :func:`check_bundle` (``cmhash verify``, ``Encoder.load(..., verify=True)``) runs
those inputs through the chosen backend and variant on this machine and judges the
outputs with the same contract, because a variant verified where it was exported may
compute differently on another CPU or GPU.

The contract: fp32 within ``fp32_tolerance`` of every tanh value (on a backend that runs
full float32) and ``fp32_bit_floor`` of the bits; every other variant ``bit_floor`` of the
bits. The ``.npz`` files hold plain arrays and are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from .backends import backend_class, backends_for
from .errors import BundleError, InvalidArgumentError, ReferenceCheckError

DEFAULT_BIT_FLOOR = 0.97
FP32_TOLERANCE = 1e-4
FP32_BIT_FLOOR = 0.999
DEFAULT_REFERENCE_ITEMS = 16


@dataclass(frozen=True)
class Contract:
    """How close a variant's outputs must be to PyTorch's."""

    bit_floor: float = DEFAULT_BIT_FLOOR  # reduced precision: share of bits that agree
    fp32_tolerance: float = FP32_TOLERANCE  # fp32: largest |tanh difference|
    fp32_bit_floor: float = FP32_BIT_FLOOR  # fp32: share of bits that agree

    def __post_init__(self):
        for name in ("bit_floor", "fp32_bit_floor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
                raise InvalidArgumentError(f"{name} must be in (0, 1], got {value!r}")
        if not isinstance(self.fp32_tolerance, (int, float)) or self.fp32_tolerance < 0:
            raise InvalidArgumentError(f"fp32_tolerance must be >= 0, got {self.fp32_tolerance!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Contract":
        return cls(**{k: float(data[k]) for k in ("bit_floor", "fp32_tolerance", "fp32_bit_floor") if k in data})


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How far a variant's tanh outputs are from the reference's, and how many bits agree."""
    if reference.shape != candidate.shape:
        raise InvalidArgumentError(f"outputs of shape {candidate.shape} cannot be compared with the reference's {reference.shape}")
    if not np.isfinite(candidate).all():
        return {"items": int(len(reference)), "max_abs_delta": float("inf"), "mean_abs_delta": float("inf"),
                "bit_agreement": 0.0, "identical_codes": 0.0, "non_finite": True}
    delta = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    same = (reference >= 0) == (candidate >= 0)  # sign with 0 -> +1, as the codes
    return {
        "items": int(len(reference)),
        "max_abs_delta": float(delta.max()) if delta.size else 0.0,
        "mean_abs_delta": float(delta.mean()) if delta.size else 0.0,
        "bit_agreement": float(same.mean()) if same.size else 1.0,
        "identical_codes": float(same.all(axis=1).mean()) if same.size else 1.0,
    }


def judge(result: dict, variant: str, backend: str, contract: Contract) -> dict:
    """Add the criterion and ``passed`` to an :func:`agreement` result."""
    if variant == "fp32" and backend_class(backend).exact_fp32:
        result["criterion"] = f"max_abs_delta <= {contract.fp32_tolerance:g} and bit_agreement >= {contract.fp32_bit_floor:g}"
        result["passed"] = (result["max_abs_delta"] <= contract.fp32_tolerance
                            and result["bit_agreement"] >= contract.fp32_bit_floor)
    elif variant == "fp32":  # e.g. TensorRT's TF32 layers: bits are the contract
        result["criterion"] = f"bit_agreement >= {contract.fp32_bit_floor:g}"
        result["passed"] = result["bit_agreement"] >= contract.fp32_bit_floor
    else:
        result["criterion"] = f"bit_agreement >= {contract.bit_floor:g}"
        result["passed"] = result["bit_agreement"] >= contract.bit_floor
    return result



def result_line(result: dict) -> str:
    """One judged result as the commands print it: where, bits, largest delta, verdict."""
    verdict = "ok" if result["passed"] else f"FAIL ({result['criterion']})"
    variant = result["variant"] + (" (ort)" if result.get("format") == "ort" else "")
    return (f"  {result['modality']:5} {variant:18} {result['backend']:11}  bits {result['bit_agreement']:.4%}  "
            f"max|d| {result['max_abs_delta']:.2e}  {verdict}")


# --- the files -----------------------------------------------------------------------------------


def reference_file(inputs: np.ndarray, outputs: np.ndarray) -> bytes:
    """The ``.npz`` bytes of one modality's reference set: ``inputs`` exactly as the model
    is fed them (any float or 0/1 integer dtype; read back as float32) and the PyTorch
    tanh ``outputs`` (float32)."""
    buffer = io.BytesIO()
    np.savez(buffer, inputs=inputs, outputs=np.asarray(outputs, dtype=np.float32))
    return buffer.getvalue()


def read_reference(bundle, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, outputs) of ``modality``'s reference set, both float32."""
    name = bundle.manifest["reference"]["modalities"][modality]["file"]
    spec = bundle.modality(modality)
    try:
        with np.load(io.BytesIO(bundle.files[name]), allow_pickle=False) as z:
            inputs, outputs = z["inputs"], z["outputs"]
    except (ValueError, KeyError, OSError) as exc:
        raise BundleError(f"{bundle.source}: {name} is not a reference set (.npz with inputs and outputs): {exc}") from exc
    shape = tuple(spec["input"]["shape"][1:])
    if inputs.shape[1:] != shape or outputs.shape != (len(inputs), bundle.bits) or inputs.dtype.kind not in "fiub":
        raise BundleError(f"{bundle.source}: {name} holds inputs {inputs.shape} and outputs {outputs.shape}; the "
                          f"{modality} model takes (N, {', '.join(map(str, shape))}) and gives (N, {bundle.bits})")
    return inputs.astype(np.float32), outputs.astype(np.float32)


def unchecked_reason(bundle) -> str | None:
    """Why this bundle cannot be checked on the device, or None when it can."""
    if "reference" not in bundle.manifest:
        return (f"{bundle.source} carries no reference inputs and codes (it was exported by an older cmhash "
                "or without them); re-export it to make it checkable")
    return None


# --- checking ------------------------------------------------------------------------------------


def check_models(bundle, backends: dict, variant: str, contract: Contract | None = None,
                 model_format: str = "onnx") -> list[dict]:
    """Judge ``backends`` (modality -> a made backend of ``variant``) on the bundle's
    reference sets: one result per modality."""
    contract = contract or bundle_contract(bundle)
    results = []
    for modality, backend in backends.items():
        inputs, expected = read_reference(bundle, modality)
        got = np.asarray(backend.run(np.ascontiguousarray(inputs)), dtype=np.float32)
        result = {"modality": modality, "variant": variant, "backend": backend.name, "format": model_format,
                  **agreement(expected, got)}
        results.append(judge(result, variant, backend.name, contract))
    return results


def bundle_contract(bundle, **overrides) -> Contract:
    stored = bundle.manifest.get("reference", {}).get("contract", {})
    return Contract.from_dict({**stored, **{k: v for k, v in overrides.items() if v is not None}})


def check_bundle(
    path,
    *,
    variants=None,
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    bit_floor: float | None = None,
    **backend_options,
) -> dict:
    """Check every variant of a bundle (or ``variants``) on this machine against its
    reference codes, and the ORT-format copy of each that has one (on onnxruntime).
    Returns ``{"checkable", "reason", "results", "variants": {variant: passed}, "ort":
    {variant: passed}, ...}``; a variant the backend does not run is listed under ``skipped``."""
    from .bundle import Bundle, load_bundle
    from .encoder import Encoder

    bundle = path if isinstance(path, Bundle) and not path.partial else load_bundle(getattr(path, "source", path))
    report = {"bundle": bundle.source, "backend": backend, "device": device, "results": [], "variants": {},
              "ort": {}, "skipped": {}}
    reason = unchecked_reason(bundle)
    if reason:
        return {**report, "checkable": False, "reason": reason}
    contract = bundle_contract(bundle, bit_floor=bit_floor)
    report.update(checkable=True, reason=None, contract=contract.to_dict())
    available = [v for v in bundle.variants(bundle.modalities[0]) if all(v in bundle.variants(m) for m in bundle.modalities)]
    for variant in variants or available:
        if backend != "auto" and variant not in backend_class(backend).variants:
            report["skipped"][variant] = f"{backend} does not run {variant} (it runs on {', '.join(backends_for(variant))})"
            continue
        with Encoder.load(bundle, backend=backend, device=device, threads=threads, variant=variant,
                          model_format="onnx", **backend_options) as encoder:
            results = check_models(bundle, encoder.backends, variant, contract)
        report["results"] += results
        report["variants"][variant] = all(r["passed"] for r in results)
        if backend in ("auto", "onnxruntime") and all(variant in bundle.ort_variants(m) for m in bundle.modalities):
            with Encoder.load(bundle, backend="onnxruntime", device=device, threads=threads, variant=variant,
                              model_format="ort", **backend_options) as encoder:
                results = check_models(bundle, encoder.backends, variant, contract, "ort")
            report["results"] += results
            report["ort"][variant] = all(r["passed"] for r in results)
    report["items"] = {m: int(bundle.manifest["reference"]["modalities"][m]["items"]) for m in bundle.modalities}
    return report


def describe_failure(results: list[dict]) -> str:
    failed = [r for r in results if not r["passed"]]
    return "; ".join(f"{r['modality']} {r['variant']} on {r['backend']}: {r['bit_agreement']:.2%} of bits, "
                     f"max |delta| {r['max_abs_delta']:.2e} (needs {r['criterion']})" for r in failed)


def require_agreement(bundle, backends: dict, variant: str, *, backend: str, device: str, threads: int | None,
                      model_format: str = "onnx", **backend_options) -> dict:
    """What ``Encoder.load(..., verify=True)`` does: check the loaded ``backends`` on the
    reference sets; below the contract, raise :class:`ReferenceCheckError` naming the
    variants that do pass on this machine. A bundle without reference data is loaded with
    a warning that says why it could not be checked."""
    reason = unchecked_reason(bundle)
    if reason:
        warnings.warn(f"verify=True: cannot check: {reason}", UserWarning, stacklevel=3)
        return {"checkable": False, "reason": reason}
    results = check_models(bundle, backends, variant, model_format=model_format)
    if all(r["passed"] for r in results):
        return {"checkable": True, "passed": True, "results": results}
    others = [v for v in bundle.variants(bundle.modalities[0]) if v != variant]
    report = check_bundle(bundle, variants=others, backend=backend, device=device, threads=threads, **backend_options)
    passing = [v for v, ok in report["variants"].items() if ok]
    advice = (f"variants that do: {', '.join(passing)}; load with variant={passing[0]!r}" if passing
              else "no variant of this bundle does; use fp32 on another backend or device, or re-export")
    raise ReferenceCheckError(
        f"the {variant} models of {bundle.source} do not reproduce their reference codes on this machine "
        f"({describe_failure(results)}); {advice}",
        {"variant": variant, "results": results + report["results"], "passing_variants": passing})
