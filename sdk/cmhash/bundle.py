"""Model bundles: a directory (or one zip archive of it) that holds everything needed to hash.

Layout::

    bundle/
      manifest.json     what follows, plus the sha256 of every other file
      image.onnx        image tower: pixel_values float32 [N, 3, H, W] -> tanh codes [N, bits]
      text.onnx         text tower:  bow float32 [N, d] -> tanh codes [N, bits]
      vocab.json        the text vocabulary and tokenisation rules (cmhash.text), if any

``manifest.json`` (format 1.x)::

    {
      "format_version": "1.0",
      "method": "egath",
      "bits": 64,
      "modalities": {
        "image": {"file": "image.onnx",
                  "input": {"name": "pixel_values", "shape": ["batch", 3, 224, 224], "dtype": "float32"},
                  "output": {"name": "codes", "values": "tanh"},
                  "preprocess": {"image_size": 224, "mean": [...], "std": [...],
                                 "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}},
        "text":  {"file": "text.onnx",
                  "input": {"name": "bow", "shape": ["batch", 1386], "dtype": "float32"},
                  "output": {"name": "codes", "values": "tanh"},
                  "vocabulary": "vocab.json", "vocabulary_fingerprint": "<sha256 of its canonical JSON>"}
      },
      "label_names": ["animals", ...],
      "provenance": {"cmhash_version": "0.1.0", "training_config": {...}, "metrics": {...},
                     "pretrained": {"library": "open_clip", "model": "ViT-B-32", "tag": "openai",
                                    "file": "open_clip_model.safetensors", "sha256": "<sha256>"}},
      "files": {"image.onnx": "<sha256>", "text.onnx": "<sha256>", "vocab.json": "<sha256>"}
    }

Optional reduced-precision variants of a tower (format 1.1; readers of 1.0 ignore them)::

        "image": {..., "variants": {"fp16": {"file": "image.fp16.onnx"},
                                    "int8": {"file": "image.int8.onnx"},
                                    "int8-dynamic": {"file": "image.int8-dynamic.onnx"}}}

A variant takes and gives exactly what the main file does (float32 input and output); only
the arithmetic inside differs. ``Encoder.load(path, variant="int8")`` picks one.
``int8-dynamic`` holds onnxruntime-only (com.microsoft) operators: CPU onnxruntime, not TensorRT.

ORT-format copies of the towers (format 1.3; readers of 1.0-1.2 ignore them), written by
``cmhash export --ort``: onnxruntime's flatbuffer format with the graph already optimised
to ``optimization_level``, for reduced onnxruntime builds (which read ORT files only, and
are compiled for the operators listed in ``required_operators``) and for a faster cold
load::

        "image": {..., "ort": {"fp32": {"file": "image.ort"}, "int8": {"file": "image.int8.ort"}}}
    "ort_format": {"optimization_level": "extended", "onnxruntime": "1.32.0",
                   "required_operators": "required_operators.config"}

An ORT file holds the same arithmetic as its ONNX variant and is verified like it;
``Encoder.load(path, model_format="ort")`` loads it.

Reference inputs and codes (format 1.2; readers of 1.0 and 1.1 ignore them), for checking
on the device that its backend reproduces what PyTorch gave (:mod:`cmhash.reference`)::

    "reference": {"contract": {"bit_floor": 0.97, "fp32_tolerance": 0.0001, "fp32_bit_floor": 0.999},
                  "modalities": {"image": {"file": "reference/image.npz", "items": 16},
                                 "text": {"file": "reference/text.npz", "items": 16}}}

Each ``.npz`` holds ``inputs`` (the model inputs, preprocessed) and ``outputs`` (PyTorch's
tanh values); it is listed under ``files`` and checksummed like the models.

``output.values`` is ``"tanh"`` (continuous values in [-1, 1], signed at hashing) or
``"sign"`` (already ±1; no continuous output). A text modality without a vocabulary
takes bag-of-words vectors only (e.g. MIRFlickr, whose tag words are not published).

``provenance.pretrained`` (optional, any 1.x; null or absent: trained from random weights)
names the weights the image backbone started from: the library (``open_clip``, ``timm``,
``torchvision``, or ``cmhash`` / ``matconvnet`` for a network's own file), its model name, the
tag (null for a local file), the file name and its sha256. ``describe_pretrained`` prints it.

Versioning: a reader accepts every minor version of a major it knows (minor versions only
add optional keys) and refuses other majors. Loading reads every file once, checks its
sha256, and keeps the verified bytes, so what runs is exactly what was checked;
``Encoder.load`` reads only the files it runs (a bundle with every variant holds several
copies of each tower, and reading and hashing them all would dominate a cold start). Nothing is
ever unpickled: the manifest and vocabulary are JSON, the models ONNX.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping

from . import limits
from ._version import __version__
from .codes import check_bits
from .errors import (
    BundleChecksumError,
    BundleError,
    BundleNotFoundError,
    BundlePermissionError,
    BundleTooLargeError,
    BundleVersionError,
    InvalidArgumentError,
    ResourceLimitError,
)
from .files import atomic_path, fsync, temp_dir_beside
from .preprocess import ImagePreprocessor
from .text import Vocabulary

FORMAT_VERSION = "1.3"  # 1.1 added optional per-modality "variants", 1.2 the optional "reference",
# 1.3 the optional ORT-format copies ("ort" per modality, "ort_format")
SUPPORTED_MAJOR_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
MODALITIES = ("image", "text")
OUTPUT_VALUES = ("tanh", "sign")
VARIANTS = ("fp32", "fp16", "int8", "int8-dynamic")  # fp32 is the modality's own "file"
MODEL_FORMATS = ("onnx", "ort")  # ort: onnxruntime's flatbuffer format (format 1.3)
# Guards against zip bombs: a bundle holds a few models, not terabytes.
# Guards against zip bombs (the byte limit is cmhash.limits.MAX_BUNDLE_BYTES): a bundle holds
# a few models and a small manifest, not thousands of files.
MAX_BUNDLE_FILES = 1000
MAX_MANIFEST_BYTES = 16 * 2**20
_CHUNK = 1 << 20
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what cmhash pack and plain zip tools write
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so the same bundle packs to the same bytes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: its manifest and the bytes of every file it lists."""

    manifest: dict
    files: Mapping[str, bytes]
    source: str
    partial: bool = False  # only some listed files were read (load_bundle's ``select``)

    @property
    def format_version(self) -> str:
        return self.manifest["format_version"]

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def bits(self) -> int:
        return self.manifest["bits"]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.manifest["modalities"])

    @property
    def label_names(self) -> list[str]:
        return list(self.manifest.get("label_names", []))

    @property
    def fingerprint(self) -> str:
        """sha256 naming the code space this bundle hashes into: the method, the bit length
        and the fp32 model of each modality. Codes of two bundles are comparable exactly when
        their fingerprints are equal; the reduced-precision variants of one bundle share it
        (they approximate the fp32 model), so adding a variant does not change it."""
        models = {m: self.manifest["files"][self.modality(m)["file"]] for m in self.modalities}
        space = {"method": self.method, "bits": self.bits, "models": models}
        return sha256_bytes(json.dumps(space, sort_keys=True, separators=(",", ":")).encode())

    def modality(self, name: str) -> dict:
        try:
            return self.manifest["modalities"][name]
        except KeyError:
            raise BundleError(
                f"bundle {self.source} has no {name} model (it has: {', '.join(self.modalities)})"
            ) from None

    def variants(self, name: str) -> tuple[str, ...]:
        """The precisions modality ``name`` is available in, ``"fp32"`` first."""
        return ("fp32", *(v for v in VARIANTS if v in self.modality(name).get("variants", {})))

    def ort_variants(self, name: str) -> tuple[str, ...]:
        """The variants of modality ``name`` that have an ORT-format copy."""
        return tuple(v for v in VARIANTS if v in self.modality(name).get("ort", {}))

    def model_file(self, name: str, variant: str = "fp32", model_format: str = "onnx") -> str:
        spec = self.modality(name)
        if model_format not in MODEL_FORMATS:
            raise InvalidArgumentError(f"unknown model format {model_format!r}; choose one of {', '.join(MODEL_FORMATS)}")
        if model_format == "ort":
            self.model_file(name, variant)  # an unknown or missing variant says so first
            try:
                return spec["ort"][variant]["file"]
            except KeyError:
                raise BundleError(
                    f"bundle {self.source} has no ORT-format {variant} {name} model (it has: "
                    f"{', '.join(self.ort_variants(name)) or 'none'}); export it with --ort"
                ) from None
        if variant == "fp32":
            return spec["file"]
        if variant not in VARIANTS:
            raise InvalidArgumentError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        try:
            return spec["variants"][variant]["file"]
        except KeyError:
            raise BundleError(
                f"bundle {self.source} has no {variant} {name} model (it has: {', '.join(self.variants(name))}); "
                f"export it with --{variant}"
            ) from None

    def model_bytes(self, name: str, variant: str = "fp32", model_format: str = "onnx") -> bytes:
        """The verified bytes of a model, refused if it would read weights from elsewhere."""
        file = self.model_file(name, variant, model_format)
        if file not in self.files:
            raise BundleError(f"{self.source} was loaded without {file}; load the whole bundle (load_bundle(path))")
        data = self.files[file]
        if model_format == "onnx" and _uses_external_data(data):  # an ORT file holds all its weights
            raise BundleError(
                f"{self.source}: {file} keeps weights in external data files, which a runtime would read "
                "from outside the checked bundle; export the model with its weights inside the .onnx file"
            )
        return data

    def image_preprocessor(self, **overrides) -> ImagePreprocessor:
        return ImagePreprocessor.from_dict(self.modality("image")["preprocess"], **overrides)

    def vocabulary(self) -> Vocabulary | None:
        spec = self.modality("text")
        if spec.get("vocabulary") is None:
            return None
        vocab = Vocabulary.from_json(self.files[spec["vocabulary"]])
        if vocab.fingerprint != spec["vocabulary_fingerprint"]:
            raise BundleChecksumError(
                f"{spec['vocabulary']} in {self.source} is a different vocabulary from the one the model "
                f"was exported with (fingerprint {vocab.fingerprint[:12]}, manifest "
                f"{spec['vocabulary_fingerprint'][:12]})"
            )
        if vocab.dim != spec["input"]["shape"][1]:
            raise BundleError(
                f"{spec['vocabulary']} has {vocab.dim} words but the text model takes "
                f"{spec['input']['shape'][1]} inputs"
            )
        return vocab


# --- manifest pieces -----------------------------------------------------------------------


def image_modality(
    file: str,
    preprocess: ImagePreprocessor,
    *,
    input_name: str = "pixel_values",
    output_name: str = "codes",
    output_values: str = "tanh",
) -> dict:
    """The manifest entry of an image tower."""
    height, width = preprocess.output_size
    return {
        "file": file,
        "input": {"name": input_name, "shape": ["batch", 3, height, width], "dtype": "float32"},
        "output": {"name": output_name, "values": output_values},
        "preprocess": preprocess.to_dict(),
    }


def text_modality(
    file: str,
    dim: int,
    *,
    vocabulary: Vocabulary | None = None,
    vocabulary_file: str = "vocab.json",
    input_name: str = "bow",
    output_name: str = "codes",
    output_values: str = "tanh",
) -> dict:
    """The manifest entry of a text tower; with a vocabulary, also name its file (whose
    bytes the caller passes to :func:`write_bundle`, e.g. ``vocabulary.to_json()``)."""
    entry = {
        "file": file,
        "input": {"name": input_name, "shape": ["batch", int(dim)], "dtype": "float32"},
        "output": {"name": output_name, "values": output_values},
        "vocabulary": None,
    }
    if vocabulary is not None:
        entry["vocabulary"] = vocabulary_file
        entry["vocabulary_fingerprint"] = vocabulary.fingerprint
    return entry


# --- validation ----------------------------------------------------------------------------


def check_version(manifest: Any, source: str) -> None:
    if not isinstance(manifest, dict):
        raise BundleError(f"{source}: manifest.json must hold a JSON object")
    version = manifest.get("format_version")
    match = re.fullmatch(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    if match is None:
        raise BundleVersionError(f"{source}: format_version must be 'major.minor', got {version!r}")
    if int(match.group(1)) not in SUPPORTED_MAJOR_VERSIONS:
        supported = ", ".join(f"{m}.x" for m in SUPPORTED_MAJOR_VERSIONS)
        raise BundleVersionError(
            f"{source}: bundle format {version} is not supported; this cmhash-sdk {__version__} reads "
            f"format {supported}. Install a cmhash-sdk that reads {match.group(1)}.x, or re-export the bundle"
        )


def check_file_name(name: Any, source: str) -> str:
    """A bundle file name: relative, '/'-separated, no '..', no drive, not the manifest."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{source}: file names must be non-empty strings, got {name!r}")
    parts = PurePosixPath(name).parts
    if (
        name.startswith("/")
        or "\\" in name
        or ":" in name
        or "\0" in name
        or any(part in ("", ".", "..") for part in name.split("/"))
        or not parts
    ):
        raise BundleError(f"{source}: unsafe file name {name!r} (absolute, '..', backslash or drive); refused")
    if name == MANIFEST_NAME:
        raise BundleError(f"{source}: {MANIFEST_NAME} cannot list itself")
    return name


def validate_manifest(manifest: Any, source: str = "bundle") -> dict:
    """Check a manifest against format 1 and return it; raise :class:`BundleError` saying
    which key is wrong."""
    check_version(manifest, source)

    def fail(message: str):
        raise BundleError(f"{source}: manifest.json: {message}")

    if not isinstance(manifest.get("method"), str) or not manifest["method"]:
        fail("'method' must be a non-empty string (e.g. 'egath')")
    bits = manifest.get("bits")
    check_bits(bits, f"{source}: manifest.json: 'bits'", BundleError)
    files = manifest.get("files")
    if not isinstance(files, dict):
        fail("'files' must map each file name to its sha256")
    for name, digest in files.items():
        check_file_name(name, source)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            fail(f"files[{name!r}] must be a lowercase hex sha256, got {digest!r}")
    modalities = manifest.get("modalities")
    if not isinstance(modalities, dict) or not modalities:
        fail("'modalities' must hold at least one of 'image' and 'text'")
    unknown = set(modalities) - set(MODALITIES)
    if unknown:
        fail(f"unknown modalities {sorted(unknown)}; known: {list(MODALITIES)}")
    for name, spec in modalities.items():
        _validate_modality(name, spec, files, fail)
    labels = manifest.get("label_names", [])
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        fail("'label_names' must be a list of strings")
    if not isinstance(manifest.get("provenance", {}), dict):
        fail("'provenance' must be an object")
    _validate_pretrained(manifest.get("provenance", {}).get("pretrained"), fail)
    if any(spec.get("ort") for spec in modalities.values()):
        ort_format = manifest.get("ort_format")
        if not isinstance(ort_format, dict) or not isinstance(ort_format.get("optimization_level"), str):
            fail("'ort_format' must say the optimization_level its ORT files were saved at")
        if ort_format.get("required_operators") not in files:
            fail("ort_format.required_operators is not listed in 'files'")
    if "reference" in manifest:
        _validate_reference(manifest["reference"], modalities, files, fail)
    return manifest


def _validate_pretrained(pretrained: Any, fail) -> None:
    """provenance.pretrained (optional): null, or the weights the image backbone started from."""
    if pretrained is None:
        return
    if not isinstance(pretrained, dict):
        fail("provenance.pretrained must be null or an object with library, model, tag, file and sha256")
    for key in ("library", "model", "tag", "file"):
        if not isinstance(pretrained.get(key), (str, type(None))):
            fail(f"provenance.pretrained.{key} must be a string or null, got {pretrained.get(key)!r}")
    digest = pretrained.get("sha256")
    if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        fail(f"provenance.pretrained.sha256 must be a lowercase hex sha256 or null, got {digest!r}")


def describe_pretrained(pretrained: Mapping[str, Any] | None) -> str:
    """One line naming the weights a model's image backbone started from (a checkpoint's or
    a manifest's ``provenance.pretrained`` record), for ``cmhash eval`` and any tool that
    shows a bundle."""
    if not pretrained:
        return "random initialisation (no pretrained weights)"
    what = f"tag {pretrained['tag']!r}" if pretrained.get("tag") else "a local file"
    digest = pretrained.get("sha256") or "?"
    return (f"{pretrained.get('library')} {pretrained.get('model')} {what} "
            f"(file {pretrained.get('file')}, sha256 {digest[:16]}...)")


def _validate_reference(reference: Any, modalities: dict, files: dict, fail) -> None:
    if not isinstance(reference, dict) or not isinstance(reference.get("modalities"), dict):
        fail("'reference' must be an object with 'contract' and 'modalities'")
    contract = reference.get("contract")
    if not isinstance(contract, dict) or not all(
            isinstance(contract.get(k), (int, float)) and not isinstance(contract.get(k), bool)
            for k in ("bit_floor", "fp32_tolerance", "fp32_bit_floor")):
        fail("reference.contract must give bit_floor, fp32_tolerance and fp32_bit_floor as numbers")
    if set(reference["modalities"]) != set(modalities):
        fail(f"reference.modalities must cover the bundle's modalities {sorted(modalities)}, "
             f"got {sorted(reference['modalities'])}")
    for name, entry in reference["modalities"].items():
        if not isinstance(entry, dict) or entry.get("file") not in files:
            fail(f"reference.modalities.{name}.file is not listed in 'files'")
        items = entry.get("items")
        if not isinstance(items, int) or isinstance(items, bool) or items < 1:
            fail(f"reference.modalities.{name}.items must be a positive int, got {items!r}")


def _validate_modality(name: str, spec: Any, files: dict, fail) -> None:
    where = f"modalities.{name}"
    if not isinstance(spec, dict):
        fail(f"{where} must be an object")
    if spec.get("file") not in files:
        fail(f"{where}.file {spec.get('file')!r} is not listed in 'files'")
    tensor = spec.get("input")
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        fail(f"{where}.input must be an object with a 'name'")
    if tensor.get("dtype") != "float32":
        fail(f"{where}.input.dtype must be 'float32', got {tensor.get('dtype')!r}")
    shape = tensor.get("shape")
    rank = 4 if name == "image" else 2
    if (
        not isinstance(shape, list)
        or len(shape) != rank
        or shape[0] != "batch"
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:])
    ):
        fail(f"{where}.input.shape must be ['batch', {', '.join(['<int>'] * (rank - 1))}], got {shape!r}")
    output = spec.get("output")
    if not isinstance(output, dict) or not isinstance(output.get("name"), str):
        fail(f"{where}.output must be an object with a 'name'")
    if output.get("values") not in OUTPUT_VALUES:
        fail(f"{where}.output.values must be one of {list(OUTPUT_VALUES)}, got {output.get('values')!r}")
    if name == "image":
        if shape[1] != 3:
            fail(f"{where}.input.shape must have 3 channels, got {shape[1]}")
        try:
            preprocess = ImagePreprocessor.from_dict(spec.get("preprocess"))
        except ResourceLimitError:
            raise  # a size over a limit the user may raise, not a malformed manifest
        except (TypeError, ValueError) as exc:
            fail(f"{where}.preprocess is invalid: {exc}")
        if list(preprocess.output_size) != shape[2:]:
            fail(f"{where}.preprocess makes {preprocess.output_size} images but the input is {shape[2:]}")
    variants = spec.get("variants", {})
    if not isinstance(variants, dict):
        fail(f"{where}.variants must be an object")
    for variant, entry in variants.items():
        if variant not in VARIANTS[1:]:
            fail(f"{where}.variants: unknown variant {variant!r}; known: {list(VARIANTS[1:])}")
        if not isinstance(entry, dict) or entry.get("file") not in files:
            fail(f"{where}.variants.{variant}.file is not listed in 'files'")
    ort = spec.get("ort", {})
    if not isinstance(ort, dict):
        fail(f"{where}.ort must be an object")
    for variant, entry in ort.items():
        if variant != "fp32" and variant not in variants:
            fail(f"{where}.ort: {variant!r} is not a variant of this modality")
        if not isinstance(entry, dict) or entry.get("file") not in files:
            fail(f"{where}.ort.{variant}.file is not listed in 'files'")
    if name != "image":
        vocab = spec.get("vocabulary")
        if vocab is not None:
            if vocab not in files:
                fail(f"{where}.vocabulary {vocab!r} is not listed in 'files'")
            if not isinstance(spec.get("vocabulary_fingerprint"), str):
                fail(f"{where}.vocabulary_fingerprint is missing")


# --- writing -------------------------------------------------------------------------------


def write_bundle(
    directory: str | os.PathLike,
    manifest: dict,
    files: Mapping[str, bytes | str | os.PathLike],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a bundle directory atomically: everything goes into a temporary sibling
    directory that is renamed into place, so readers never see half a bundle.

    Args:
        directory: where the bundle goes.
        manifest: the manifest without 'files' (computed here); 'format_version' defaults
            to :data:`FORMAT_VERSION`, 'provenance.cmhash_version' to this version.
        files: bundle file name -> bytes or a path to copy from.
        overwrite: replace an existing directory (else :class:`FileExistsError`).
    """
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    contents: dict[str, bytes] = {}
    for name, data in files.items():
        check_file_name(name, str(directory))
        contents[name] = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else Path(data).read_bytes()
    manifest = json.loads(json.dumps(manifest))  # a deep copy that also proves it is JSON
    manifest.setdefault("format_version", FORMAT_VERSION)
    manifest.setdefault("provenance", {}).setdefault("cmhash_version", __version__)
    manifest.setdefault("label_names", [])
    manifest["files"] = {name: sha256_bytes(data) for name, data in sorted(contents.items())}
    validate_manifest(manifest, str(directory))

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_dir_beside(directory)
    try:
        for name, data in contents.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            fsync(target)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        fsync(staging / MANIFEST_NAME)
        fsync(staging)
        if directory.exists():
            old = temp_dir_beside(directory, suffix=".old")
            os.replace(directory, old / "bundle")
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync(directory.parent)
    return directory


def pack_archive(directory: str | os.PathLike, archive: str | os.PathLike | None = None) -> Path:
    """Pack a bundle directory into one zip file (default ``<directory>.zip``), after
    verifying it. Entries are stored uncompressed, in name order, with fixed timestamps,
    so the same bundle always packs to the same bytes. Written atomically."""
    bundle = load_bundle(directory)
    directory = Path(directory)
    archive = Path(archive) if archive is not None else directory.parent / f"{directory.name}.zip"
    with atomic_path(archive) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        entries = {MANIFEST_NAME: (directory / MANIFEST_NAME).read_bytes(), **dict(sorted(bundle.files.items()))}
        for name, data in entries.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, data)
    return archive


# --- reading -------------------------------------------------------------------------------


def load_bundle(path: str | os.PathLike, select: Callable[[Bundle], Iterable[str]] | None = None) -> Bundle:
    """Load and verify a bundle from a directory or a zip archive.

    ``select``, given the bundle with its manifest checked but no file read, names the
    files to read and verify; the others are checked to be present, and left unread.

    The members are listed (names, types and declared sizes) and compared with the manifest
    before any model is read: a member the manifest does not list is refused unread, and
    each listed one is read once, in chunks, up to its declared size, while its sha256 is
    computed.

    Raises:
        BundleNotFoundError: nothing at ``path``.
        BundlePermissionError: the bundle or one of its files may not be read by this process.
        BundleVersionError: a format major version this cmhash does not read.
        BundleChecksumError: a file whose sha256 differs from the manifest (named).
        BundleTooLargeError: files adding up to more than ``cmhash.limits.MAX_BUNDLE_BYTES``.
        BundleError: no or malformed manifest, missing, extra, unsafe or linked files, an
            encrypted or unreadable archive.
    """
    path = Path(path)
    source = str(path)
    try:
        if not path.exists():
            raise BundleNotFoundError(f"bundle not found: {path}")
        if path.is_dir():
            return _load(_DirectoryMembers(path), source, select)
        if not path.is_file():  # a FIFO or a device: opening it could block forever
            raise BundleError(f"{path} is not a regular file, a bundle directory or a zip archive of one")
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return _load(_ArchiveMembers(zf, source), source, select)
        raise BundleError(f"{path} is neither a bundle directory nor a zip archive of one")
    except PermissionError as exc:
        raise BundlePermissionError(
            f"{source}: permission denied reading {exc.filename or 'the bundle'}; give this user read "
            "access to the bundle (files) and its folders (read and execute)"
        ) from exc
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise BundleError(f"{source}: the archive is corrupt or truncated: {exc}") from exc
    except OSError as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{source}: cannot read the bundle: {exc}") from exc


def _load(members, source: str, select=None) -> Bundle:
    sizes = members.sizes
    if MANIFEST_NAME not in sizes:
        raise BundleError(f"{source} has no {MANIFEST_NAME}; it is not a cmhash bundle")
    if sizes[MANIFEST_NAME] > MAX_MANIFEST_BYTES:
        raise BundleError(f"{source}: {MANIFEST_NAME} is {sizes[MANIFEST_NAME]:,} bytes; a manifest is at most {MAX_MANIFEST_BYTES:,}")
    text = members.read(MANIFEST_NAME, sizes[MANIFEST_NAME], hashlib.sha256())
    try:
        manifest = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{source}: {MANIFEST_NAME} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise BundleError(f"{source}: {MANIFEST_NAME} is nested too deeply to be a manifest") from None
    check_version(manifest, source)  # before the schema: a future format may look different
    validate_manifest(manifest, source)
    listed = manifest["files"]
    missing = sorted(set(listed) - set(sizes))
    if missing:
        raise BundleError(f"{source}: files listed in the manifest are missing: {', '.join(missing)}")
    extra = sorted(set(sizes) - set(listed) - {MANIFEST_NAME})
    if extra:
        raise BundleError(
            f"{source}: files not listed in the manifest: {', '.join(extra)}; remove them or re-export the bundle"
        )
    total = sum(sizes[name] for name in listed)
    if total > limits.MAX_BUNDLE_BYTES:
        raise BundleTooLargeError(
            f"{source}: the bundle's files add up to {total:,} bytes, over the limit of "
            f"{limits.MAX_BUNDLE_BYTES:,}; raise cmhash.limits.MAX_BUNDLE_BYTES "
            "(env CMHASH_MAX_BUNDLE_BYTES) if the bundle is trusted"
        )
    files: dict[str, bytes] = {}
    wanted = set(listed) if select is None else set(select(Bundle(manifest=manifest, files={}, source=source)))
    for name, expected in sorted(listed.items()):
        if name not in wanted:
            continue
        digest = hashlib.sha256()
        files[name] = members.read(name, sizes[name], digest)
        actual = digest.hexdigest()
        if actual != expected:
            raise BundleChecksumError(
                f"{source}: {name} fails its checksum (sha256 {actual[:16]}..., manifest says "
                f"{expected[:16]}...); the file is corrupt or was changed after export"
            )
    return Bundle(manifest=manifest, files=files, source=source, partial=len(files) < len(listed))


def _read_exactly(fh, name: str, size: int, digest, source: str) -> bytes:
    """Read ``size`` bytes in chunks, hashing as they come; refuse a member of another size
    (a header that lies, a file that changed since it was listed)."""
    chunks = []
    left = size + 1  # one more, to notice a member longer than declared
    while left > 0:
        chunk = fh.read(min(left, _CHUNK))
        if not chunk:
            break
        digest.update(chunk)
        chunks.append(chunk)
        left -= len(chunk)
    data = b"".join(chunks)
    if len(data) != size:
        raise BundleError(f"{source}: {name} is not the size its listing says ({size:,} bytes)")
    return data


class _DirectoryMembers:
    """The regular files under a bundle folder, by '/'-separated name, with their sizes."""

    def __init__(self, root: Path):
        self.root = root
        self.sizes: dict[str, int] = {}

        def fail(error: OSError):
            raise error

        for current, dirs, names in os.walk(root, onerror=fail, followlinks=False):
            for entry in dirs + names:
                full = Path(current) / entry
                rel = full.relative_to(root).as_posix()
                info = full.lstat()
                if stat.S_ISLNK(info.st_mode):
                    raise BundleError(f"{root}: {rel} is a symbolic link; bundles hold plain files only")
                if entry in names:
                    if not stat.S_ISREG(info.st_mode):
                        raise BundleError(f"{root}: {rel} is not a regular file")
                    if len(self.sizes) >= MAX_BUNDLE_FILES:
                        raise BundleError(f"{root}: more than {MAX_BUNDLE_FILES} files; this is not a bundle")
                    self.sizes[rel] = info.st_size

    def read(self, name: str, size: int, digest) -> bytes:
        with open(self.root / name, "rb") as fh:
            return _read_exactly(fh, name, size, digest, str(self.root))


class _ArchiveMembers:
    """The members of a bundle zip, checked from its central directory before any is read."""

    def __init__(self, zf: zipfile.ZipFile, source: str):
        self.zf, self.source = zf, source
        self.infos: dict[str, zipfile.ZipInfo] = {}
        infos = zf.infolist()
        if len(infos) > MAX_BUNDLE_FILES:
            raise BundleError(f"{source}: more than {MAX_BUNDLE_FILES} members; this is not a bundle")
        for info in infos:
            if info.is_dir():
                continue
            name = info.filename
            if name != MANIFEST_NAME:
                check_file_name(name, source)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BundleError(f"{source}: {name} is a symbolic link; bundles hold plain files only")
            if name in self.infos:
                raise BundleError(f"{source}: {name} appears twice in the archive")
            if info.flag_bits & 0x1:
                raise BundleError(f"{source}: {name} is encrypted; bundles are plain zip archives (cmhash pack)")
            if info.compress_type not in _ZIP_METHODS:
                raise BundleError(
                    f"{source}: {name} uses zip compression method {info.compress_type}, which cmhash does not "
                    "read; repack the bundle folder with cmhash pack (stored) or plain deflate"
                )
            self.infos[name] = info
        self.sizes = {name: info.file_size for name, info in self.infos.items()}

    def read(self, name: str, size: int, digest) -> bytes:
        with self.zf.open(self.infos[name]) as fh:
            return _read_exactly(fh, name, size, digest, self.source)


# --- ONNX external data ----------------------------------------------------------------------
# A model may keep tensors in files beside it ("external data"); a runtime given the model's
# bytes resolves those names against its working directory, outside what the manifest checked.
# This walks the ONNX protobuf just far enough to find such tensors, with no onnx package.
# Field numbers from onnx.proto: message -> {field: sub-message holding tensors}.
_ONNX_FIELDS = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {},
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1
_MAX_NESTING = 64


def _uses_external_data(model: bytes) -> bool:
    """True when any tensor of the ONNX model is stored outside it. Bytes that are not a
    well-formed protobuf are left for the runtime to refuse."""
    stack = [("model", memoryview(model), 0)]
    try:
        while stack:
            kind, data, depth = stack.pop()
            if depth > _MAX_NESTING:
                return True  # no exported tower nests graphs this deep; refuse rather than guess
            for field, wire, value in _protobuf_fields(data):
                if kind == "tensor" and (
                    field == _TENSOR_EXTERNAL_DATA or (field == _TENSOR_DATA_LOCATION and value == _EXTERNAL)
                ):
                    return True
                child = _ONNX_FIELDS[kind].get(field)
                if child is not None and wire == 2:
                    stack.append((child, value, depth + 1))
    except ValueError:
        return False
    return False


def _protobuf_fields(data: memoryview):
    """(field number, wire type, value) of each field of one protobuf message; the value is a
    memoryview for length-delimited fields, an int for varints, None otherwise."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf")
        yield field, wire, value


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 64:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")
