"""``export_checkpoint``: checkpoint -> verified bundle (ONNX towers, variants, manifest)."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from cmhash import __version__
from cmhash.backends import ModelSpec, create_backend
from cmhash.bundle import ONNXRUNTIME_ONLY_VARIANTS, image_modality, load_bundle, pack_archive, text_modality, write_bundle
from cmhash.errors import BackendUnavailableError, ExportError, VerificationError

from .loading import Trained
from .onnx_export import IMAGE_INPUT, OPSET, OUTPUT_NAME, TEXT_INPUT, export_tower
from .variants import quantize_int8, quantize_int8_dynamic, tensorrt_precision, to_fp16
from .verify import (
    RealInputs,
    agreement,
    inputs_from_dataset,
    inputs_from_path,
    inputs_from_training_data,
    judge,
    retrieval_map,
    run_backend,
    torch_outputs,
)

log = logging.getLogger("cmhash.export")

DEFAULT_BIT_FLOOR = 0.97
FP32_TOLERANCE = 1e-4
FP32_BIT_FLOOR = 0.999


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    fp16: bool = False,
    int8: bool = False,
    int8_dynamic: bool = False,
    tensorrt: bool = False,
    verify_data: Any = None,
    calibration_data: Any = None,
    verify_items: int = 256,
    calibration_items: int = 128,
    bit_floor: float = DEFAULT_BIT_FLOOR,
    fp32_tolerance: float = FP32_TOLERANCE,
    fp32_bit_floor: float = FP32_BIT_FLOOR,
    overwrite: bool = False,
    archive: bool = False,
    tensorrt_cache_dir: str | Path | None = None,
) -> dict:
    """Export a trained checkpoint to a bundle, verified against PyTorch on real inputs.

    Args:
        checkpoint: a checkpoint directory written by the trainer (``runs/x/best``).
        out: the bundle directory to write.
        fp16, int8: also export these variants of each tower (int8 is calibrated on real
            inputs: ``calibration_data``, else the training data, else ``verify_data``).
        int8_dynamic: also export the fused, dynamically quantised int8 towers
            (onnxruntime on CPU only; no calibration; TensorRT skips them).
        tensorrt: build TensorRT engines of every variant on this GPU (cached, see
            :mod:`cmhash.backends.tensorrt_backend`) and verify them too.
        verify_data: real inputs to verify on: a folder of images, an image list or a
            manifest (path), or a dataset of training items; ``None``: the training data.
        calibration_data: like ``verify_data``, for int8 calibration only.
        verify_items, calibration_items: how many items to use at most.
        bit_floor: fp16/int8 fail below this fraction of bits agreeing with PyTorch.
        fp32_tolerance, fp32_bit_floor: the fp32 contract (max |tanh delta|, bit agreement).
        overwrite: replace an existing bundle.
        archive: also write ``<out>.zip``.
        tensorrt_cache_dir: where engines go (default ``$CMHASH_CACHE_DIR`` or ~/.cache/cmhash).

    Returns:
        The report: per modality and variant the agreement with PyTorch (``results``), mAP
        per variant when labels are known (``map``), the inputs used, files and timings.

    Raises:
        VerificationError: a variant below its contract (``.report`` has every figure);
            nothing is written then.
        ExportError: unreadable checkpoint, a tower that does not export, no real inputs.
        BackendUnavailableError: ``tensorrt=True`` without TensorRT and a GPU.
    """
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if tensorrt:
        from cmhash.backends.tensorrt_backend import tensorrt_available

        ok, reason = tensorrt_available()
        if not ok:
            raise BackendUnavailableError(f"--tensorrt needs TensorRT and a GPU here: {reason}")
    if not 0.0 < bit_floor <= 1.0:
        raise ValueError(f"bit_floor must be in (0, 1], got {bit_floor}")

    trained = Trained.load(checkpoint)
    method = trained.method
    pre, vocabulary = trained.image_preprocessor(), trained.vocabulary()
    label_names = list(trained.meta.get("label_names") or [])
    inputs = _real_inputs(verify_data, trained, pre, vocabulary, label_names, verify_items)
    towers = {"image": method.image_tower(), "text": method.text_tower()}
    input_names = {"image": IMAGE_INPUT, "text": TEXT_INPUT}
    _complete(inputs, trained, verify_items)
    _check_input_shapes(inputs, pre, trained.text_dim)

    # ONNX export of each tower on a real batch.
    models: dict[str, dict[str, bytes]] = {}
    notes: dict[str, Any] = {}
    for modality, tower in towers.items():
        batch = inputs.of(modality)
        example = torch.from_numpy(batch[: min(4, len(batch))].copy())
        models[modality] = {"fp32": export_tower(tower, example, input_names[modality], trained.bits, modality)}

    # Reduced-precision variants.
    if int8:
        calibration = inputs if calibration_data is None else _real_inputs(
            calibration_data, trained, pre, vocabulary, label_names, calibration_items)
        if calibration_data is None and verify_data is not None:
            try:  # prefer the training data, so calibration and verification differ
                calibration = inputs_from_training_data(trained, calibration_items)
            except ExportError:
                pass
        notes["int8"] = {"calibration_source": calibration.source,
                         "calibration_overlaps_verification": calibration.source == inputs.source}
    for modality in towers:
        if fp16:
            models[modality]["fp16"] = to_fp16(models[modality]["fp32"], modality)
        if int8:
            data = calibration.of(modality)
            if data is None:  # e.g. calibration images only: texts from the verification inputs
                data = inputs.of(modality)
            q, info = quantize_int8(models[modality]["fp32"], input_names[modality], data[:calibration_items], modality)
            models[modality]["int8"] = q
            notes["int8_" + modality] = info
        if int8_dynamic:
            q, info = quantize_int8_dynamic(models[modality]["fp32"], modality)
            models[modality]["int8-dynamic"] = q
            notes["int8-dynamic_" + modality] = info

    # Verification against PyTorch on the real inputs.
    results, outputs = [], {}
    reference = {m: torch_outputs(towers[m], inputs.of(m)) for m in towers if inputs.of(m) is not None}
    for modality, variants in models.items():
        if modality not in reference:
            continue
        spec = _spec(modality, input_names[modality], pre, trained)
        for variant, data in variants.items():
            backends = [("onnxruntime", {})]
            if tensorrt and variant not in ONNXRUNTIME_ONLY_VARIANTS:
                backends.append(("tensorrt", {"precision": tensorrt_precision(variant), "cache_dir": tensorrt_cache_dir}))
            for kind, options in backends:
                device = "cuda" if kind == "tensorrt" else "cpu"
                backend = create_backend(kind, data, spec, device=device, variant=variant, **options)
                try:
                    got = run_backend(backend, inputs.of(modality))
                finally:
                    backend.close()
                outputs[(modality, variant, kind)] = got
                result = {"modality": modality, "variant": variant, "backend": kind,
                          **agreement(reference[modality], got)}
                results.append(judge(result, variant, kind, fp32_tolerance=fp32_tolerance,
                                     fp32_bit_floor=fp32_bit_floor, bit_floor=bit_floor))

    maps = {}
    if inputs.paired and inputs.labels is not None and len(inputs.labels) >= 2 and len(reference) == 2:
        maps["pytorch"] = retrieval_map(reference["image"], reference["text"], inputs.labels)
        for (modality, variant, kind) in outputs:
            if modality == "image" and (("text", variant, kind) in outputs):
                m = retrieval_map(outputs[("image", variant, kind)], outputs[("text", variant, kind)], inputs.labels)
                m["delta_i2t"] = m["i2t"] - maps["pytorch"]["i2t"]
                m["delta_t2i"] = m["t2i"] - maps["pytorch"]["t2i"]
                maps[variant if kind == "onnxruntime" else f"{variant}/{kind}"] = m

    report = {
        "checkpoint": str(trained.path),
        "bundle": str(out),
        "method": trained.meta["method"],
        "bits": trained.bits,
        "inputs": inputs.describe(),
        "results": results,
        "map": maps,
        "notes": notes,
        "passed": all(r["passed"] for r in results),
        "files": {},
    }
    failed = [r for r in results if not r["passed"]]
    if failed:
        report["seconds"] = round(time.perf_counter() - started, 2)
        worst = ", ".join(f"{r['modality']} {r['variant']} on {r['backend']}: bits {r['bit_agreement']:.4f}, "
                          f"max |delta| {r['max_abs_delta']:.2e} (needs {r['criterion']})" for r in failed)
        raise VerificationError(f"exported models disagree with PyTorch: {worst}; nothing was written", report)

    manifest, files = _manifest(trained, models, pre, vocabulary, label_names, input_names, report)
    write_bundle(out, manifest, files, overwrite=overwrite)
    load_bundle(out)  # what was written reads back and verifies
    report["files"] = {name: len(data) for name, data in sorted(files.items())}
    if archive:
        report["archive"] = str(pack_archive(out))
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


# --- helpers ---------------------------------------------------------------------------------------


def _real_inputs(data: Any, trained: Trained, pre, vocabulary, label_names, limit: int) -> RealInputs:
    if data is None:
        return inputs_from_training_data(trained, limit)
    if isinstance(data, (str, Path)):
        return inputs_from_path(data, pre, vocabulary, trained.text_dim, label_names, limit)
    if isinstance(data, RealInputs):
        return data
    return inputs_from_dataset(data, limit, f"a dataset of {len(data)} items")


def _check_input_shapes(inputs: RealInputs, pre, text_dim: int) -> None:
    if inputs.pixels is not None and inputs.pixels.shape[1:] != (3, *pre.output_size):
        raise ExportError(f"verification images have shape {inputs.pixels.shape[1:]}, the model takes (3, {pre.output_size})")
    if inputs.bow is not None and inputs.bow.shape[1] != text_dim:
        raise ExportError(f"verification texts have {inputs.bow.shape[1]} columns, the model takes {text_dim}")


def _complete(inputs: RealInputs, trained: Trained, limit: int) -> None:
    """Every tower is verified on real inputs: a modality the given data lacks (texts, for
    a folder of images) comes from the training data, or the export stops."""
    missing = [m for m in ("image", "text") if inputs.of(m) is None]
    if not missing:
        return
    try:
        extra = inputs_from_training_data(trained, limit)
    except ExportError as exc:
        raise ExportError(
            f"{inputs.source} has no {' or '.join(missing)} inputs and the training data is not available "
            f"to verify the {' and '.join(missing)} tower with; give a manifest with images, texts (or tags) "
            f"and labels ({exc})"
        ) from None
    for modality in missing:
        setattr(inputs, "pixels" if modality == "image" else "bow", extra.of(modality))
    inputs.paired, inputs.labels = False, None
    inputs.source += f" (+ {' and '.join(missing)} of the {extra.source})"


def _spec(modality: str, input_name: str, pre, trained: Trained) -> ModelSpec:
    shape = ("batch", 3, *pre.output_size) if modality == "image" else ("batch", trained.text_dim)
    return ModelSpec(what=f"the exported {modality} model", input_name=input_name, input_shape=shape,
                     output_name=OUTPUT_NAME, bits=trained.bits)


def _manifest(trained: Trained, models, pre, vocabulary, label_names, input_names, report) -> tuple[dict, dict]:
    import onnx
    import onnxruntime

    files: dict[str, bytes] = {}
    modalities = {}
    for modality, variants in models.items():
        main = f"{modality}.onnx"
        files[main] = variants["fp32"]
        if modality == "image":
            entry = image_modality(main, pre, input_name=input_names["image"], output_name=OUTPUT_NAME)
        else:
            entry = text_modality(main, trained.text_dim, vocabulary=vocabulary, input_name=input_names["text"],
                                  output_name=OUTPUT_NAME)
            if vocabulary is not None:
                files["vocab.json"] = vocabulary.to_json().encode("utf-8")
        extra = {}
        for variant, data in variants.items():
            if variant != "fp32":
                name = f"{modality}.{variant}.onnx"
                files[name] = data
                extra[variant] = {"file": name}
        if extra:
            entry["variants"] = extra
        modalities[modality] = entry
    meta = trained.meta
    history = meta.get("history") or []
    manifest = {
        "method": meta["method"],
        "bits": trained.bits,
        "modalities": modalities,
        "label_names": label_names,
        "provenance": {
            "cmhash_version": __version__,
            "training_config": meta.get("config", {}),
            "metrics": {"best": meta.get("best"), "last": history[-1] if history else None},
            "checkpoint": {"path": str(trained.path), "epoch": meta.get("epoch"), "sha256": meta.get("sha256", {})},
            "export": {
                "opset": OPSET,
                "exporter": "torch.onnx (TorchScript)",
                "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                             "python": platform.python_version()},
                "verification": {
                    "inputs": report["inputs"]["source"],
                    "results": [{k: r[k] for k in ("modality", "variant", "backend", "items", "max_abs_delta",
                                                   "bit_agreement", "passed")} for r in report["results"]],
                    "map": report["map"],
                },
            },
        },
    }
    return manifest, files
