"""``export_checkpoint``: checkpoint -> verified bundle (ONNX towers, variants, manifest).

The export runs in phases, each a function of its own: :func:`export_towers` (PyTorch ->
ONNX), :func:`make_variants` (fp16, int8, int8-dynamic), :func:`verify_variants` (every
variant on every chosen backend against PyTorch, on the verification inputs and on the
reference set the bundle will carry), :func:`keep_passing` (what goes into the bundle),
:func:`make_ort` (ORT-format copies of what is kept, verified the same way) and
:func:`build_manifest`.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmhash import __version__
from cmhash.backends import ModelSpec, backend_class, create_backend, default_device
from cmhash.bundle import image_modality, load_bundle, pack_archive, text_modality, write_bundle
from cmhash.errors import BackendUnavailableError, ExportError, VerificationError
from cmhash.reference import (
    DEFAULT_BIT_FLOOR,
    DEFAULT_REFERENCE_ITEMS,
    FP32_BIT_FLOOR,
    FP32_TOLERANCE,
    Contract,
    agreement,
    judge,
    reference_file,
)

from .loading import Trained
from .onnx_export import IMAGE_INPUT, OPSET, OUTPUT_NAME, TEXT_INPUT, export_tower
from .ort import OPS_CONFIG, ORT_OPTIMIZATION_LEVEL, convert_to_ort, ort_name
from .variants import quantize_int8, quantize_int8_dynamic, to_fp16
from .verify import (
    RealInputs,
    inputs_from_dataset,
    inputs_from_path,
    inputs_from_training_data,
    retrieval_map,
    run_backend,
    torch_outputs,
)

log = logging.getLogger("cmhash.export")

INPUT_NAMES = {"image": IMAGE_INPUT, "text": TEXT_INPUT}


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    fp16: bool = False,
    int8: bool = False,
    int8_dynamic: bool = False,
    ort: bool = False,
    tensorrt: bool = False,
    verify_data: Any = None,
    calibration_data: Any = None,
    verify_items: int = 256,
    calibration_items: int = 128,
    reference_items: int = DEFAULT_REFERENCE_ITEMS,
    bit_floor: float = DEFAULT_BIT_FLOOR,
    fp32_tolerance: float = FP32_TOLERANCE,
    fp32_bit_floor: float = FP32_BIT_FLOOR,
    strict: bool = False,
    overwrite: bool = False,
    archive: bool = False,
    tensorrt_cache_dir: str | Path | None = None,
) -> dict:
    """Export a trained checkpoint to a bundle, verified against PyTorch on real inputs.

    Args:
        checkpoint: a checkpoint directory written by the trainer (``runs/x/best``), or a
            :class:`~cmhash.export.loading.Trained` already in memory.
        out: the bundle directory to write.
        fp16, int8: also export these variants of each tower (int8 is calibrated on real
            inputs: ``calibration_data``, else the training data, else ``verify_data``).
        int8_dynamic: also export the fused, dynamically quantised int8 towers
            (onnxruntime on CPU only; no calibration; TensorRT skips them).
        ort: also write every tower that passes in onnxruntime's ORT format, its graph
            optimised to a portable level, and the operators a reduced onnxruntime build
            needs (``required_operators.config``); see :mod:`cmhash.export.ort`.
        tensorrt: build TensorRT engines of every variant on this GPU (cached, see
            :mod:`cmhash.backends.tensorrt_backend`) and verify them too.
        verify_data: real inputs to verify on: a folder of images, an image list or a
            manifest (path), or a dataset of training items; ``None``: the training data.
        calibration_data: like ``verify_data``, for int8 calibration only.
        verify_items, calibration_items: how many items to use at most.
        reference_items: how many verification items per modality the bundle carries, with
            PyTorch's outputs for them, so that a device can check itself
            (``Encoder.load(..., verify=True)``, ``cmhash verify``).
        bit_floor: fp16/int8 fail below this fraction of bits agreeing with PyTorch.
        fp32_tolerance, fp32_bit_floor: the fp32 contract (max |tanh delta|, bit agreement).
        strict: a variant that fails verification fails the whole export (nothing is
            written); by default it is left out of the bundle and reported.
        overwrite: replace an existing bundle.
        archive: also write ``<out>.zip``.
        tensorrt_cache_dir: where engines go (default ``$CMHASH_CACHE_DIR`` or ~/.cache/cmhash).

    Returns:
        The report: per modality and variant the agreement with PyTorch (``results``), mAP
        per variant when labels are known (``map``), the variants left out (``dropped``,
        variant -> why), the variants written (``variants``), the inputs used, files and timings.

    Raises:
        VerificationError: fp32 below its contract, or any variant with ``strict``
            (``.report`` has every figure); nothing is written then.
        ExportError: unreadable checkpoint, a tower that does not export, no real inputs.
        BackendUnavailableError: ``tensorrt=True`` without TensorRT and a GPU.
    """
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    contract = Contract(bit_floor, fp32_tolerance, fp32_bit_floor)
    backends = verification_backends(tensorrt, tensorrt_cache_dir)

    trained = checkpoint if isinstance(checkpoint, Trained) else Trained.load(checkpoint)
    inputs = _real_inputs(verify_data, trained, verify_items)
    _complete(inputs, trained, verify_items)
    _check_input_shapes(inputs, trained.image_preprocessor(), trained.text_dim)
    towers = {"image": trained.method.image_tower(), "text": trained.method.text_tower()}

    fp32 = export_towers(towers, inputs, trained.bits)
    calibration = None
    if int8:
        calibration = _calibration_inputs(calibration_data, verify_data, inputs, trained, calibration_items)
    models, notes = make_variants(fp32, fp16=fp16, int8=int8, int8_dynamic=int8_dynamic, calibration=calibration,
                                  fallback=inputs, calibration_items=calibration_items)
    if calibration is not None:
        notes["int8"] = {"calibration_source": calibration.source,
                         "calibration_overlaps_verification": calibration.source == inputs.source}
    pytorch = {m: torch_outputs(towers[m], inputs.of(m)) for m in towers}
    references = reference_sets(towers, inputs, reference_items)
    specs = {m: _spec(m, trained) for m in towers}
    results, outputs = verify_variants(models, specs, inputs, pytorch, references, backends, contract)

    report = {
        "checkpoint": str(trained.path),
        "bundle": str(out),
        "method": trained.meta["method"],
        "bits": trained.bits,
        "inputs": inputs.describe(),
        "results": results,
        "map": _maps(inputs, pytorch, outputs),
        "notes": notes,
        "passed": all(r["passed"] for r in results),
        "files": {},
    }
    dropped = keep_passing(results)
    report["dropped"] = dropped
    if "fp32" in dropped or (strict and dropped):
        report["seconds"] = round(time.perf_counter() - started, 2)
        raise VerificationError(f"exported models disagree with PyTorch: {'; '.join(dropped.values())}; "
                                "nothing was written", report)
    for variant, why in dropped.items():
        log.warning("the %s variant is left out of the bundle: %s", variant, why)
        for variants in models.values():
            variants.pop(variant, None)
    report["variants"] = list(models["image"])
    ort_models: dict = {}
    if ort:
        ort_models = make_ort(models)
        on_cpu = [("onnxruntime", "cpu", {"model_format": "ort"})]
        ort_results, _ = verify_variants(ort_models["models"], specs, inputs, pytorch, references, on_cpu, contract)
        report["results"] += ort_results
        report["passed"] = report["passed"] and all(r["passed"] for r in ort_results)
        for variant, why in keep_passing(ort_results).items():
            if strict:
                raise VerificationError(f"the ORT-format {variant} models disagree with PyTorch: {why}; nothing "
                                        "was written", report)
            log.warning("the ORT-format %s variant is left out of the bundle: %s", variant, why)
            report["dropped"][f"{variant} (ort)"] = why
            for variants in ort_models["models"].values():
                variants.pop(variant, None)
        report["ort"] = {"variants": list(ort_models["models"]["image"]), "optimization_level": ORT_OPTIMIZATION_LEVEL,
                         "required_operators": OPS_CONFIG}

    manifest, files = build_manifest(trained, models, references, contract, report, ort_models)
    write_bundle(out, manifest, files, overwrite=overwrite)
    load_bundle(out)  # what was written reads back and verifies
    report["files"] = {name: len(data) for name, data in sorted(files.items())}
    if archive:
        report["archive"] = str(pack_archive(out))
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


# --- phases ----------------------------------------------------------------------------------------


def verification_backends(tensorrt: bool, cache_dir: str | Path | None) -> list[tuple[str, str, dict]]:
    """(backend, device, options) to verify every variant on: onnxruntime on the CPU, and
    TensorRT on the GPU when asked (refused here, before any work, when it cannot run)."""
    chosen = [("onnxruntime", "cpu", {})]
    if tensorrt:
        ok, reason = backend_class("tensorrt").available("cuda")
        if not ok:
            raise BackendUnavailableError(f"--tensorrt needs TensorRT and a GPU here: {reason}")
        chosen.append(("tensorrt", default_device("tensorrt"), {"cache_dir": cache_dir}))
    return chosen


def export_towers(towers: dict, inputs: RealInputs, bits: int) -> dict[str, bytes]:
    """Phase 1: each PyTorch tower to an fp32 ONNX model, traced on a few real inputs."""
    models = {}
    for modality, tower in towers.items():
        batch = inputs.of(modality)
        example = torch.from_numpy(batch[: min(4, len(batch))].copy())
        models[modality] = export_tower(tower, example, INPUT_NAMES[modality], bits, modality)
    return models


def make_variants(fp32: dict[str, bytes], *, fp16: bool, int8: bool, int8_dynamic: bool,
                  calibration: RealInputs | None, fallback: RealInputs, calibration_items: int) -> tuple[dict, dict]:
    """Phase 2: {modality: {variant: model bytes}} with fp32 first, and what each
    quantisation did. int8 calibrates on ``calibration``, or on ``fallback`` for a modality
    it lacks (e.g. calibration images only: texts from the verification inputs)."""
    models: dict[str, dict[str, bytes]] = {}
    notes: dict[str, Any] = {}
    for modality, model in fp32.items():
        models[modality] = {"fp32": model}
        if fp16:
            models[modality]["fp16"] = to_fp16(model, modality)
        if int8:
            data = calibration.of(modality)
            if data is None:
                data = fallback.of(modality)
            q, notes["int8_" + modality] = quantize_int8(model, INPUT_NAMES[modality], data[:calibration_items], modality)
            models[modality]["int8"] = q
        if int8_dynamic:
            q, notes["int8-dynamic_" + modality] = quantize_int8_dynamic(model, modality)
            models[modality]["int8-dynamic"] = q
    return models, notes


def make_ort(models: dict[str, dict[str, bytes]]) -> dict:
    """Phase 4b: ``{"models": {modality: {variant: ORT-format bytes}}, "config": the
    required-operators configuration of them all}`` for the variants kept (:mod:`cmhash.export.ort`)."""
    names = {(m, v): _file_name(m, v) for m, variants in models.items() for v in variants}
    converted, config = convert_to_ort({names[m, v]: models[m][v] for m, v in names})
    return {"models": {m: {v: converted[ort_name(names[m, v])] for v in variants} for m, variants in models.items()},
            "config": config}


def _file_name(modality: str, variant: str) -> str:
    return f"{modality}.onnx" if variant == "fp32" else f"{modality}.{variant}.onnx"


def reference_sets(towers: dict, inputs: RealInputs, items: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first ``items`` verification inputs of each modality, as the bundle stores them
    (images in float16, 0/1 bag-of-words in uint8: a quarter or half the bytes), and
    PyTorch's outputs for exactly those stored values."""
    if not isinstance(items, int) or items < 1:
        raise ValueError(f"reference_items must be a positive int, got {items!r}")
    sets = {}
    for modality, tower in towers.items():
        batch = inputs.of(modality)[:items]
        if modality == "image":
            stored = batch.astype(np.float16)
        elif np.isin(batch, (0.0, 1.0)).all():
            stored = batch.astype(np.uint8)
        else:
            stored = batch.astype(np.float32)
        sets[modality] = (stored, torch_outputs(tower, stored.astype(np.float32)))
    return sets


def verify_variants(models: dict, specs: dict, inputs: RealInputs, pytorch: dict, references: dict,
                    backends: list[tuple[str, str, dict]], contract: Contract) -> tuple[list[dict], dict]:
    """Phase 3: every variant of every modality on every backend that runs it, judged
    against PyTorch on the verification inputs and on the reference set (both must pass:
    the bundle's own check on the device uses the reference set). Returns the results and
    the outputs by (modality, variant, backend)."""
    results, outputs = [], {}
    for modality, variants in models.items():
        ref_inputs, ref_outputs = references[modality]
        for variant, data in variants.items():
            for kind, device, options in backends:
                if variant not in backend_class(kind).variants:
                    continue
                backend = create_backend(kind, data, specs[modality], device=device, variant=variant, **options)
                try:
                    got = run_backend(backend, inputs.of(modality))
                    got_reference = run_backend(backend, ref_inputs.astype(np.float32))
                finally:
                    backend.close()
                outputs[(modality, variant, kind)] = got
                result = judge({"modality": modality, "variant": variant, "backend": kind,
                                "format": options.get("model_format", "onnx"),
                                **agreement(pytorch[modality], got)}, variant, kind, contract)
                on_reference = judge(agreement(ref_outputs, got_reference), variant, kind, contract)
                result["reference"] = {k: on_reference[k] for k in ("items", "bit_agreement", "max_abs_delta", "passed")}
                result["passed"] = result["passed"] and on_reference["passed"]
                results.append(result)
    return results, outputs


def keep_passing(results: list[dict]) -> dict[str, str]:
    """Phase 4: the variants to leave out of the bundle, each with why. A variant goes when
    any of its checks failed (every modality and backend: a bundle variant is one set of
    towers); the caller refuses to write at all when fp32 is among them, or with ``strict``."""
    dropped: dict[str, list[str]] = {}
    for r in results:
        if not r["passed"]:
            ref = r["reference"]
            dropped.setdefault(r["variant"], []).append(
                f"{r['modality']} {r['variant']} on {r['backend']}: bits {r['bit_agreement']:.4f}, max |delta| "
                f"{r['max_abs_delta']:.2e} on {r['items']} items, bits {ref['bit_agreement']:.4f} on the "
                f"{ref['items']} reference items (needs {r['criterion']})")
    return {variant: "; ".join(why) for variant, why in dropped.items()}


def build_manifest(trained: Trained, models: dict, references: dict, contract: Contract, report: dict,
                   ort_models: dict | None = None) -> tuple[dict, dict]:
    """Phase 5: the manifest and the files of the bundle (models, ORT copies, vocabulary,
    reference sets). ``ort_models`` is what :func:`make_ort` gave (after verification), or empty."""
    import onnx
    import onnxruntime

    pre, vocabulary = trained.image_preprocessor(), trained.vocabulary()
    files: dict[str, bytes] = {}
    modalities = {}
    for modality, variants in models.items():
        main = f"{modality}.onnx"
        files[main] = variants["fp32"]
        if modality == "image":
            entry = image_modality(main, pre, input_name=INPUT_NAMES["image"], output_name=OUTPUT_NAME)
        else:
            entry = text_modality(main, trained.text_dim, vocabulary=vocabulary, input_name=INPUT_NAMES["text"],
                                  output_name=OUTPUT_NAME)
            if vocabulary is not None:
                files["vocab.json"] = vocabulary.to_json().encode("utf-8")
        extra = {}
        for variant, data in variants.items():
            if variant != "fp32":
                name = _file_name(modality, variant)
                files[name] = data
                extra[variant] = {"file": name}
        if extra:
            entry["variants"] = extra
        if ort_models and ort_models["models"].get(modality):
            entry["ort"] = {}
            for variant, data in ort_models["models"][modality].items():
                files[ort_name(_file_name(modality, variant))] = data
                entry["ort"][variant] = {"file": ort_name(_file_name(modality, variant))}
        modalities[modality] = entry
    reference = {"contract": contract.to_dict(), "modalities": {}}
    for modality, (inputs, outputs) in references.items():
        name = f"reference/{modality}.npz"
        files[name] = reference_file(inputs, outputs)
        reference["modalities"][modality] = {"file": name, "items": int(len(inputs))}
    meta = trained.meta
    history = meta.get("history") or []
    ort_format = {}
    if ort_models:
        files[OPS_CONFIG] = ort_models["config"].encode("utf-8")
        ort_format = {"ort_format": {"optimization_level": ORT_OPTIMIZATION_LEVEL, "onnxruntime": onnxruntime.__version__,
                                     "required_operators": OPS_CONFIG}}
    manifest = {
        "method": meta["method"],
        "bits": trained.bits,
        "modalities": modalities,
        "label_names": list(meta.get("label_names") or []),
        "reference": reference,
        **ort_format,
        "provenance": {
            "cmhash_version": __version__,
            "training_config": meta.get("config", {}),
            "metrics": {"best": meta.get("best"), "last": history[-1] if history else None},
            "checkpoint": {"path": str(trained.path), "epoch": meta.get("epoch"), "sha256": meta.get("sha256", {})},
            "pretrained": meta.get("pretrained"),
            "export": {
                "opset": OPSET,
                "exporter": "torch.onnx (TorchScript)",
                "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                             "python": platform.python_version()},
                "verification": {
                    "inputs": report["inputs"]["source"],
                    "results": [{k: r[k] for k in ("modality", "variant", "backend", "format", "items", "max_abs_delta",
                                                   "bit_agreement", "passed")} for r in report["results"]],
                    "map": report["map"],
                    "dropped": report["dropped"],
                },
            },
        },
    }
    return manifest, files


# --- helpers ---------------------------------------------------------------------------------------


def _real_inputs(data: Any, trained: Trained, limit: int) -> RealInputs:
    if data is None:
        return inputs_from_training_data(trained, limit)
    if isinstance(data, (str, Path)):
        return inputs_from_path(data, trained.image_preprocessor(), trained.vocabulary(), trained.text_dim,
                                list(trained.meta.get("label_names") or []), limit)
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


def _calibration_inputs(calibration_data: Any, verify_data: Any, inputs: RealInputs, trained: Trained,
                        limit: int) -> RealInputs:
    if calibration_data is not None:
        return _real_inputs(calibration_data, trained, limit)
    if verify_data is not None:
        try:  # prefer the training data, so calibration and verification differ
            return inputs_from_training_data(trained, limit)
        except ExportError:
            pass
    return inputs


def _spec(modality: str, trained: Trained) -> ModelSpec:
    pre = trained.image_preprocessor()
    shape = ("batch", 3, *pre.output_size) if modality == "image" else ("batch", trained.text_dim)
    return ModelSpec(what=f"the exported {modality} model", input_name=INPUT_NAMES[modality], input_shape=shape,
                     output_name=OUTPUT_NAME, bits=trained.bits)


def _maps(inputs: RealInputs, pytorch: dict, outputs: dict) -> dict:
    """mAP of PyTorch's codes and of each variant's, when the inputs are labelled pairs."""
    if not (inputs.paired and inputs.labels is not None and len(inputs.labels) >= 2):
        return {}
    maps = {"pytorch": retrieval_map(pytorch["image"], pytorch["text"], inputs.labels)}
    for (modality, variant, kind) in outputs:
        if modality == "image" and ("text", variant, kind) in outputs:
            m = retrieval_map(outputs[("image", variant, kind)], outputs[("text", variant, kind)], inputs.labels)
            m["delta_i2t"] = m["i2t"] - maps["pytorch"]["i2t"]
            m["delta_t2i"] = m["t2i"] - maps["pytorch"]["t2i"]
            maps[variant if kind == "onnxruntime" else f"{variant}/{kind}"] = m
    return maps
