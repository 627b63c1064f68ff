"""Run configuration: one YAML file plus ``key=value`` overrides, validated before training.

This module is the bottom of training's core (config, then method, then trainer): it knows
the sections and how to check them, not which methods exist. The one call that needs a
method's own ``Config`` class, :func:`parse_config`, is handed the lookup by its caller
(:func:`cmhash.training.run.load_config` passes the method registry's).

Sections of a run config (top level)::

    method: egath            # a registered method name (see cmhash.training.method.list_methods)
    data: {...}              # handed to the data layer untouched; only checked to be a mapping
    model: {...}             # the method's own Config dataclass (bits, learning rates, ...)
    train: {...}             # TrainConfig below
    eval: {...}              # EvalConfig below (optional)

Overrides use dotted paths and YAML scalars: ``train.epochs=3 model.bits=32 data.root=/x``.
A key that does not exist in ``model``, ``train`` or ``eval`` (or an unknown section) is a
:class:`ConfigError` that lists the valid keys at that level, raised before anything trains.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from cmhash import codes

from .errors import ConfigError

SECTIONS = ("method", "data", "model", "train", "eval")


def check_bits(bits: Any, where: str = "bits") -> int:
    """The runtime's code-length rule (:func:`cmhash.codes.check_bits`), failing as a ConfigError."""
    return codes.check_bits(bits, where, ConfigError)


# --------------------------------------------------------------------------- dataclasses <-> dicts


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check (and where lossless, convert) one YAML value against a dataclass field type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {annotation}")
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if annotation is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept it, it is what the user meant.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(annotation)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_mapping(cls: type, values: Mapping[str, Any] | None, section: str):
    """Build the dataclass ``cls`` from a mapping; unknown keys and wrong types are ConfigErrors."""
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigError(f"'{section}' must be a mapping of keys to values, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(f'{section}.{k}') for k in unknown)}; "
            f"valid keys in '{section}': {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], f"{section}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field left out
        raise ConfigError(f"'{section}': {exc}") from None


def to_mapping(obj) -> dict[str, Any]:
    """A dataclass as a plain JSON/YAML-friendly dict (tuples become lists)."""

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


# --------------------------------------------------------------------------- sections


@dataclass
class MethodConfig:
    """Base of every method's hyper-parameters; methods subclass it and add their fields."""

    bits: int = 64

    def __post_init__(self) -> None:
        check_bits(self.bits, "model.bits")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, section: str = "model"):
        """Build from a mapping; unknown keys are a ConfigError that lists the valid ones."""
        return from_mapping(cls, values, section)

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)


@dataclass
class TrainConfig:
    """How to train, independent of the method."""

    epochs: int = 100
    batch_size: int = 64  # per process; a torchrun job of N processes steps on N * batch_size items
    seed: int = 0
    eval_every: int = 1  # evaluate every N epochs (and always after the last one); 0: after the last only
    num_workers: int = 0
    device: str = "auto"  # 'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'
    amp: bool = False  # mixed precision on CUDA; ignored on CPU
    amp_dtype: str = "bfloat16"  # 'bfloat16' or 'float16' (float16 adds a GradScaler)
    deterministic: bool = True  # torch.use_deterministic_algorithms(warn_only) + no cudnn autotuning
    out_dir: str = "runs/default"
    log_every: int = 50  # steps between progress-bar / TensorBoard step updates
    progress: bool = True  # tqdm bars (only ever shown on a terminal, and only by rank 0)
    resume: bool = False  # continue from out_dir/last if it exists
    resume_from: str | None = None  # continue from this checkpoint directory (must exist)
    save_every: int = 1  # write the 'last' checkpoint every N epochs (and after the last one)
    dist_timeout_s: int = 3600  # collective timeout; rank 0 evaluates alone while the others wait

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "log_every": self.log_every,
                    "save_every": self.save_every, "dist_timeout_s": self.dist_timeout_s}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"train.{name} must be positive, got {value}")
        if self.eval_every < 0 or self.num_workers < 0 or self.seed < 0:
            raise ConfigError("train.eval_every, train.num_workers and train.seed must be >= 0")
        if self.seed >= 2**63:  # torch, numpy and random all take seeds below this
            raise ConfigError(f"train.seed must be below 2**63, got {self.seed}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"train.amp_dtype must be 'bfloat16' or 'float16', got {self.amp_dtype!r}")


@dataclass
class EvalConfig:
    """Evaluation during training: query set vs database set, both directions."""

    map_k: int | None = None  # mAP@k; None: mAP over the whole database
    batch_size: int = 256  # encoding batch size

    def __post_init__(self) -> None:
        if self.map_k is not None and self.map_k <= 0:
            raise ConfigError(f"eval.map_k must be positive or null, got {self.map_k}")
        if self.batch_size <= 0:
            raise ConfigError(f"eval.batch_size must be positive, got {self.batch_size}")


@dataclass
class RunConfig:
    """A validated run config: what ``load_config`` returns and the Trainer consumes."""

    method: str
    model: MethodConfig
    data: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "data": dict(self.data),
            "model": self.model.to_dict(),
            "train": to_mapping(self.train),
            "eval": to_mapping(self.eval),
        }


# --------------------------------------------------------------------------- loading


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        path, sep, text = item.partition("=")
        keys = path.strip().split(".")
        if not sep or not all(keys):
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.epochs=3")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
        if keys[0] not in SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {keys[0]!r}; valid sections: {', '.join(SECTIONS)}")
        node = out
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(keys[: depth + 1])} is not a mapping")
            node = child
        node[keys[-1]] = value
    return out


def parse_config(raw: Mapping[str, Any], method_config: Callable[[str], type[MethodConfig]]) -> RunConfig:
    """Validate a raw config mapping (e.g. parsed YAML) into a RunConfig.

    ``method_config(name)`` returns the ``Config`` dataclass of the method called ``name``
    (raising ValueError for an unknown name); it builds the ``model`` section.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a run config must be a mapping with sections {', '.join(SECTIONS)}, got {raw!r}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(map(repr, unknown))}; valid sections: {', '.join(SECTIONS)}")
    name = raw.get("method")
    if not isinstance(name, str):
        raise ConfigError(f"'method' must name a training method, got {name!r}")
    try:
        model_cls = method_config(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    data = raw.get("data") or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"'data' must be a mapping, got {data!r}")
    return RunConfig(
        method=name,
        model=model_cls.from_dict(raw.get("model")),
        data=dict(data),
        train=from_mapping(TrainConfig, raw.get("train"), "train"),
        eval=from_mapping(EvalConfig, raw.get("eval"), "eval"),
    )


def read_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A YAML run config file (or an empty one) as a mapping, with ``overrides`` applied."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    return apply_overrides(raw, overrides)
