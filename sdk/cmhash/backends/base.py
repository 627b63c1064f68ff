"""What every backend shares: the model contract (:class:`ModelSpec`), the interface
(:class:`Backend`) with the capabilities each backend declares, and device strings."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from ..bundle import VARIANTS
from ..errors import ArgumentTypeError, InvalidArgumentError


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
    float32 (N, bits).

    A backend class declares what it can do in its class attributes, which the registry
    (:mod:`cmhash.backends`) reads; nothing else in cmhash knows a backend by name.
    """

    name: str = ""
    devices: tuple[str, ...] = ("cpu",)  # device kinds, preferred first
    variants: tuple[str, ...] = VARIANTS  # bundle variants it can run
    options: tuple[str, ...] = ()  # backend-specific keyword options of create()
    exact_fp32: bool = True  # fp32 runs in full float32 (not TF32): held to the strict fp32 contract
    install_hint: str = ""

    @classmethod
    @abc.abstractmethod
    def available(cls, device: str = "cpu") -> tuple[bool, str]:
        """(True, a description) when this backend can run on ``device`` here, else
        (False, why not and what to install). Cheap, and never raises."""

    @classmethod
    @abc.abstractmethod
    def create(cls, model: bytes, spec: ModelSpec, *, device: str, device_index: int, threads: int | None,
               variant: str, **options) -> "Backend":
        """Make the backend for one model (``device`` is one of :attr:`devices`)."""

    @abc.abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:
        """Free what the backend holds (sessions, GPU memory)."""


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'cuda' -> ('cuda', 0); 'cuda:1' -> ('cuda', 1); 'auto' kept."""
    if not isinstance(device, str):
        raise ArgumentTypeError(f"device must be a string such as 'cpu', 'cuda', 'cuda:1' or 'auto', got {device!r}")
    if device in ("cpu", "auto"):
        return device, 0
    kind, _, index = device.partition(":")
    if kind == "cuda" and (index == "" or (index.isascii() and index.isdigit())):
        return "cuda", int(index or 0)
    raise InvalidArgumentError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:<index>' or 'auto'")
