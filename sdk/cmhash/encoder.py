"""Encoder: a loaded bundle that turns images and texts into packed binary codes.

    enc = Encoder.load("bundle/")                 # or "bundle.zip"
    enc.hash("cat.jpg")                           # (bits/8,) uint8
    enc.hash_images(paths, batch_size=32)         # (n, bits/8) uint8
    enc.hash_texts(["a cat on a sofa"])           # (n, bits/8) uint8
    enc.hash_texts(bow_array, return_continuous=True)  # (n, bits) float32 tanh values
    enc.hash_texts(texts, return_unknown=True)    # (codes, positions of texts with no known word)

Codes are ``sign(tanh)`` with 0 -> +1, packed by :func:`cmhash.pack_codes` (LSB first).
Images are decoded by :func:`cmhash.preprocess.load_image` and preprocessed exactly as in
training; texts are tokenised with the bundle's own vocabulary and rules.
"""

from __future__ import annotations

import os
import warnings
from itertools import islice
from typing import Any, Iterable, Iterator

import numpy as np

from .backends import Backend, ModelSpec, create_backend
from .backends.onnxruntime_backend import CPU, resolve_providers
from .bundle import Bundle, load_bundle
from .codes import pack_codes
from .errors import BundleError, CodeFormatError, InvalidArgumentError, TextInputError, UnknownTextError, UnknownTextWarning, UnsupportedInputError
from .preprocess import DEFAULT_MAX_PIXELS
from .reference import require_agreement
from .text import check_bow


class Encoder:
    """Hash images and texts with the towers of one bundle. Make it with :meth:`load`."""

    def __init__(self, bundle: Bundle, backends: dict[str, Backend], max_image_pixels: int | None, variant: str = "fp32"):
        self.bundle = bundle
        self.variant = variant
        self.backends = backends
        self.bits: int = bundle.bits
        self.method: str = bundle.method
        self.label_names: list[str] = bundle.label_names
        self.preprocessor = (
            bundle.image_preprocessor(max_pixels=max_image_pixels) if "image" in bundle.modalities else None
        )
        self.vocabulary = bundle.vocabulary() if "text" in bundle.modalities else None
        self.text_dim = bundle.modality("text")["input"]["shape"][1] if "text" in bundle.modalities else None
        self.verification: dict | None = None  # what Encoder.load(..., verify=True) found
        self.model_format = "onnx"  # or "ort": set by load

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        backend: str = "auto",
        device: str = "cpu",
        threads: int | None = None,
        *,
        variant: str = "fp32",
        providers=None,
        allow_fallback: bool = False,
        model_format: str = "auto",
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
        verify: bool = False,
        **backend_options,
    ) -> "Encoder":
        """Load and verify a bundle and make a backend for each of its models.

        Args:
            path: a bundle directory or its zip archive (or a loaded :class:`Bundle`).
            backend: ``"auto"`` (TensorRT on a GPU where it runs, else onnxruntime),
                ``"onnxruntime"`` or ``"tensorrt"``.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:<i>"`` or ``"auto"``.
            threads: CPU threads per model for onnxruntime; ``None`` for the CPUs this process may use
                (:func:`cmhash.cpus.available_cpus`).
            variant: which export of the towers to run: ``"fp32"`` (always there),
                ``"fp16"``, ``"int8"`` or ``"int8-dynamic"`` (onnxruntime on CPU only) when the
                bundle was exported with them. On TensorRT a
                reduced-precision variant is built as a strongly typed network
                (``precision="model"``) unless ``precision`` is given.
            providers: onnxruntime execution providers in priority order, each a name
                (``"OpenVINOExecutionProvider"`` or ``"openvino"``) or a ``(name, options)``
                pair; the CPU provider is the fallback (see
                :mod:`cmhash.backends.onnxruntime_backend` and
                :func:`cmhash.available_providers`). Implies the onnxruntime backend.
            allow_fallback: a provider this onnxruntime lacks (or that fails to start) is
                skipped with a warning instead of raising
                :class:`~cmhash.errors.ProviderUnavailableError`; :meth:`info` says which runs.
            model_format: ``"onnx"``, ``"ort"`` (the pre-optimised ORT-format copy that
                ``cmhash export --ort`` writes) or ``"auto"``: the ORT copy when the bundle has
                it for this variant and the model runs on the CPU provider alone, else ONNX.
            max_image_pixels: refuse larger images (decompression-bomb guard).
            verify: run the bundle's reference inputs through the loaded models and
                raise :class:`ReferenceCheckError` (naming the variants that do pass here)
                when their codes disagree with PyTorch's beyond the bundle's contract; a
                bundle without reference data loads with a warning saying so. The outcome
                is kept in :attr:`verification`.
            backend_options: TensorRT's ``precision``, ``cache_dir``, ``max_batch``.
        """
        if providers is not None:  # resolved once, so a missing provider is reported once
            providers = resolve_providers(providers, allow_fallback)
            backend_options.update(providers=providers, allow_fallback=allow_fallback)
        bundle = path if isinstance(path, Bundle) else load_bundle(
            path, select=lambda b: _files_needed(b, variant, model_format, device, providers, backend, verify))
        run_options = dict(backend_options)
        if backend in ("auto", "onnxruntime"):
            model_format = _model_format(bundle, variant, model_format, device, providers)
            if model_format == "ort":  # only onnxruntime reads it: "auto" then picks onnxruntime
                run_options["model_format"] = model_format
        elif providers is not None or model_format == "ort":
            raise InvalidArgumentError(f"providers and ORT-format models are onnxruntime's; backend={backend!r} "
                                       "takes neither (use backend='onnxruntime')")
        else:
            model_format = "onnx"
        backends: dict[str, Backend] = {}
        try:
            for modality in bundle.modalities:
                spec = bundle.modality(modality)
                file = bundle.model_file(modality, variant, model_format)
                model_spec = ModelSpec(
                    what=f"the {modality} model {file} of {bundle.source}",
                    input_name=spec["input"]["name"],
                    input_shape=tuple(spec["input"]["shape"]),
                    output_name=spec["output"]["name"],
                    bits=bundle.bits,
                )
                backends[modality] = create_backend(
                    backend, bundle.model_bytes(modality, variant, model_format), model_spec, device=device,
                    threads=threads, variant=variant, **run_options,
                )
            encoder = cls(bundle, backends, max_image_pixels, variant)
            encoder.model_format = model_format
            if verify:
                encoder.verification = require_agreement(bundle, backends, variant, backend=backend, device=device,
                                                         threads=threads, model_format=model_format, **backend_options)
            return encoder
        except BaseException:
            for made in backends.values():
                made.close()
            raise

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.bundle.modalities

    @property
    def fingerprint(self) -> str:
        """The bundle's fingerprint (:attr:`cmhash.bundle.Bundle.fingerprint`): codes of two
        encoders are comparable exactly when these are equal."""
        return self.bundle.fingerprint

    @property
    def backend(self) -> str:
        """The backend that runs the models (``"onnxruntime"`` or ``"tensorrt"``)."""
        return next(iter(self.backends.values())).name

    @property
    def providers(self) -> list[str]:
        """onnxruntime's providers that run the models, in priority order (as onnxruntime
        registered them, so a provider skipped by ``allow_fallback`` is not among them);
        ``[]`` on another backend."""
        return list(next(iter(self.backends.values())).__dict__.get("providers", []))

    def info(self) -> dict:
        """What runs: backend, providers, variant, model format, threads, the size of each
        model file, the bundle's fingerprint, and the provenance of its weights when the
        bundle records it (``provenance.pretrained``)."""
        first = next(iter(self.backends.values()))
        provenance = self.bundle.manifest.get("provenance", {})
        files = {m: self.bundle.model_file(m, self.variant, self.model_format) for m in self.modalities}
        info = {
            "bundle": self.bundle.source,
            "fingerprint": self.fingerprint,
            "method": self.method,
            "bits": self.bits,
            "modalities": list(self.modalities),
            "backend": self.backend,
            "providers": self.providers,
            "provider": self.providers[0] if self.providers else self.backend,
            "device": getattr(first, "device", None),
            "variant": self.variant,
            "model_format": self.model_format,
            "threads": getattr(first, "threads", None),
            "models": {m: {"file": f, "bytes": len(self.bundle.files[f])} for m, f in files.items()},
            "cmhash_version": provenance.get("cmhash_version"),
        }
        if provenance.get("pretrained"):
            info["pretrained"] = provenance["pretrained"]
        return info

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        variant = "" if self.variant == "fp32" else f", {self.variant}"
        return f"Encoder({self.method}, {self.bits} bits, {'+'.join(self.modalities)}, {self.backend}{variant})"

    # --- images ------------------------------------------------------------------------------

    def hash(self, image: Any, *, return_continuous: bool = False) -> np.ndarray:
        """One image (path, bytes, file object, PIL image, HWC uint8 array) -> (bits/8,) uint8,
        or (bits,) float32 tanh values with ``return_continuous``."""
        if isinstance(image, np.ndarray) and image.ndim == 4:
            raise UnsupportedInputError("hash takes one image; use hash_images for a batch (N, H, W, C)")
        return self.hash_images([image], return_continuous=return_continuous)[0]

    def hash_images(
        self, images: Iterable[Any], batch_size: int = 32, *, return_continuous: bool = False
    ) -> np.ndarray:
        """Images (any iterable, streamed ``batch_size`` at a time, or a uint8 array
        (N, H, W, C)) -> (n, bits/8) uint8 codes, or (n, bits) float32 tanh values."""
        self._require("image")
        if isinstance(images, (str, bytes, bytearray, os.PathLike)) or hasattr(images, "read"):
            raise UnsupportedInputError("hash_images takes an iterable of images; use hash for a single image")
        if isinstance(images, np.ndarray) and images.ndim != 4:
            raise UnsupportedInputError(
                f"hash_images takes a uint8 array of shape (N, H, W, C), got {images.shape}; use hash for one image"
            )
        outputs = []
        for chunk in _chunks(images, _positive(batch_size)):
            outputs.append(self._run("image", self.preprocessor(chunk), return_continuous))
        return self._finish(outputs, return_continuous)

    # --- texts -------------------------------------------------------------------------------

    def hash_text(self, text: Any, *, return_continuous: bool = False, on_unknown: str = "warn") -> np.ndarray:
        """One text (str or UTF-8 bytes), tag list or BoW vector -> (bits/8,) uint8.
        ``on_unknown`` as in :meth:`hash_texts`."""
        if isinstance(text, np.ndarray):
            if text.ndim != 1:
                raise UnsupportedInputError("hash_text takes one BoW vector (d,); use hash_texts for (n, d)")
            text = text[None, :]
        else:
            text = [text]
        codes, unknown = self._hash_texts(text, 256, return_continuous, on_unknown)
        _warn_unknown(unknown, 1, on_unknown)
        return codes[0]

    def hash_texts(self, texts: Any, batch_size: int = 256, *, return_continuous: bool = False,
                   on_unknown: str = "warn", return_unknown: bool = False) -> Any:
        """Texts, tag lists, or a BoW array (n, d) of 0/1 -> (n, bits/8) uint8 codes, or
        (n, bits) float32 tanh values. Raw text needs a bundle with a vocabulary.

        A text (or tag list) none of whose words is in the vocabulary, the empty text
        included, becomes the all-zero bag of words: every such text gets the same code.
        ``on_unknown`` says what then happens: ``"warn"`` (default; one
        :class:`~cmhash.errors.UnknownTextWarning` per call), ``"error"``
        (:class:`~cmhash.errors.UnknownTextError`) or ``"ignore"``. With
        ``return_unknown=True`` the result is ``(codes, positions)``: the positions in
        ``texts`` of those texts, as a list of ints. BoW vectors given as arrays are taken
        as they are."""
        codes, unknown = self._hash_texts(texts, batch_size, return_continuous, on_unknown)
        _warn_unknown(unknown, len(codes), on_unknown)
        return (codes, [i for i, _ in unknown]) if return_unknown else codes

    def _hash_texts(self, texts: Any, batch_size: int, return_continuous: bool,
                    on_unknown: str) -> tuple[np.ndarray, list[tuple[int, Any]]]:
        """The codes and the (position, text) of each text with no known word."""
        self._require("text")
        if on_unknown not in ("warn", "error", "ignore"):
            raise InvalidArgumentError(f"on_unknown must be 'warn', 'error' or 'ignore', got {on_unknown!r}")
        if isinstance(texts, (str, bytes)):
            raise UnsupportedInputError("hash_texts takes a list of texts; use hash_text for a single text")
        batch_size = _positive(batch_size)
        outputs, unknown = [], []
        if isinstance(texts, np.ndarray):
            bow = check_bow(texts, self.text_dim)
            for start in range(0, len(bow), batch_size):
                outputs.append(self._run("text", bow[start : start + batch_size], return_continuous))
        else:
            done = 0
            for chunk in _chunks(texts, batch_size):
                rows = self._encode_texts(chunk)
                unknown += [(done + i, item) for i, item in enumerate(chunk)
                            if not isinstance(item, np.ndarray) and not rows[i].any()]
                if unknown and on_unknown == "error":
                    position, item = unknown[0]
                    raise UnknownTextError(f"text {position} ({_short(item)}) has no word in the bundle's vocabulary; "
                                           "its code would be the empty text's (pass on_unknown='ignore' to allow that)")
                outputs.append(self._run("text", rows, return_continuous))
                done += len(chunk)
        return self._finish(outputs, return_continuous), unknown

    def _encode_texts(self, items: list) -> np.ndarray:
        rows = []
        for item in items:
            if isinstance(item, np.ndarray):
                if item.ndim != 1:
                    raise UnsupportedInputError(f"a BoW vector in a list must be 1-D ({self.text_dim},), got {item.shape}")
                rows.append(check_bow(item, self.text_dim)[0])
            elif self.vocabulary is None:
                raise TextInputError(
                    f"this bundle has no vocabulary (its text model takes {self.text_dim}-dim bag-of-words "
                    "vectors); pass BoW vectors instead of raw text"
                )
            else:
                rows.append(self.vocabulary.encode(item))
        return np.stack(rows)

    def encode_text_input(self, text: Any) -> np.ndarray:
        """One text, tag list or BoW vector -> the float32 (d,) vector the text model takes."""
        self._require("text")
        return self._encode_texts([text])[0]

    # --- shared ------------------------------------------------------------------------------

    def hash_preprocessed(self, modality: str, batch: np.ndarray, *, return_continuous: bool = False) -> np.ndarray:
        """Model inputs already prepared (float32 (N, 3, H, W) pixels from :attr:`preprocessor`,
        or (N, d) BoW rows) -> (N, bits/8) codes: for pipelines that decode in parallel."""
        self._require(modality)
        batch = np.asarray(batch, dtype=np.float32)
        expected = tuple(self.bundle.modality(modality)["input"]["shape"][1:])
        if batch.ndim != len(expected) + 1 or batch.shape[1:] != expected:
            raise UnsupportedInputError(f"{modality} inputs must have shape (N, {', '.join(map(str, expected))}), got {batch.shape}")
        return self._run(modality, batch, return_continuous)

    def _require(self, modality: str) -> None:
        if modality not in self.backends:
            raise UnsupportedInputError(
                f"this bundle has no {modality} model (it has: {', '.join(self.modalities)})"
            )

    def _run(self, modality: str, batch: np.ndarray, return_continuous: bool) -> np.ndarray:
        if return_continuous and self.bundle.modality(modality)["output"]["values"] != "tanh":
            raise UnsupportedInputError(
                f"the {modality} model of this bundle outputs signs, not tanh values; return_continuous "
                "is not available"
            )
        out = np.asarray(self.backends[modality].run(np.ascontiguousarray(batch, dtype=np.float32)))
        if out.shape != (len(batch), self.bits):
            raise CodeFormatError(
                f"the {modality} model returned shape {out.shape} for {len(batch)} items; the manifest says "
                f"({len(batch)}, {self.bits})"
            )
        out = out.astype(np.float32, copy=False)
        return out if return_continuous else pack_codes(out, input="sign")

    def _finish(self, outputs: list[np.ndarray], return_continuous: bool) -> np.ndarray:
        if outputs:
            return np.concatenate(outputs)
        if return_continuous:
            return np.zeros((0, self.bits), dtype=np.float32)
        return np.zeros((0, self.bits // 8), dtype=np.uint8)


def _files_needed(bundle: Bundle, variant: str, model_format: str, device: str, providers, backend: str,
                  verify: bool) -> list[str]:
    """The files of ``bundle`` that loading ``variant`` reads: its models, the vocabulary,
    the reference sets when verifying. Names that do not resolve are left to the loader to
    report after loading (a missing variant)."""
    if backend in ("auto", "onnxruntime"):
        model_format = _model_format(bundle, variant, model_format, device, providers)
    else:
        model_format = "onnx"
    names = []
    for modality in bundle.modalities:
        try:
            names.append(bundle.model_file(modality, variant, model_format))
        except (BundleError, InvalidArgumentError):
            pass
        if bundle.modality(modality).get("vocabulary"):
            names.append(bundle.modality(modality)["vocabulary"])
    if verify and "reference" in bundle.manifest:
        names += [entry["file"] for entry in bundle.manifest["reference"]["modalities"].values()]
    return names


def _model_format(bundle: Bundle, variant: str, asked: str, device: str, providers) -> str:
    """``"auto"``: the ORT copy when every modality has one for ``variant`` and the CPU
    provider alone runs it (the copy is optimised for the CPU provider), else ONNX."""
    if asked != "auto":
        return asked
    if device != "cpu" or not all(variant in bundle.ort_variants(m) for m in bundle.modalities):
        return "onnx"
    if providers is not None and [name for name, _ in providers] != [CPU]:
        return "onnx"
    return "ort"


def _short(text: Any, limit: int = 40) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _warn_unknown(unknown: list[tuple[int, Any]], total: int, on_unknown: str) -> None:
    """One warning per call (``on_unknown="warn"``) for the texts with no known word."""
    if unknown and on_unknown == "warn":
        position, item = unknown[0]
        warnings.warn(f"{len(unknown)} of {total} texts have no word in the bundle's vocabulary (first: text {position}, "
                      f"{_short(item)}) and get the empty text's code; pass on_unknown='error' to raise or 'ignore' "
                      "to allow it, return_unknown=True for their positions", UnknownTextWarning, stacklevel=3)


def _positive(batch_size: int) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
