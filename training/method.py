"""The interface every training method (EGATH, TEGAH, HFAH, ...) implements, and the registry.

The trainer knows nothing method-specific: it builds a method from its config, moves it to
a device, iterates batches, calls the hooks below in a fixed order, evaluates the two towers
and saves what the method exposes. One epoch of :class:`~cmhash.training.trainer.Trainer`::

    all modules .train(); method.on_epoch_start(epoch, ctx)
    for batch in this process's shard of the epoch's order:
        logs = method.train_step(batch, ctx)       # forward, ctx.backward_step(...), as often as it likes
    sync method.sample_buffers() across processes  # row i from the process that saw sample i
    extra = method.on_epoch_end(epoch, ctx)        # e.g. EGATH's discrete update of B
    every scheduler in method.schedulers() .step() # once per epoch, by the trainer
    evaluate image_tower()/text_tower() (every eval_every epochs), write checkpoints

Before the first epoch of a fresh run (not after a resume: its effect is in the saved
state) the trainer calls ``method.on_fit_start(ctx)``; ``ctx.train_batches()`` there yields one
pass over this process's shard of the training set (HFAH: label pre-training, filling the
memory banks). The sample buffers are synchronised after it; a hook that needs every row
earlier (HFAH: B = sign of the filled banks) calls ``ctx.sync_sample_buffers()`` itself.

What a method must keep where (so that checkpoints and resumes are exact):

- weights: in the ``nn.Module``s returned by :meth:`HashingMethod.modules` (saved by name);
- every other piece of state that changes during training (the discrete code matrix B,
  memory banks, ADMM multipliers, a counter, a schedule value): in
  :meth:`HashingMethod.state_tensors` as tensors (0-d tensors for scalars);
- optimisers and schedulers: returned by :meth:`optimizers` / :meth:`schedulers`, created
  once in ``__init__``. Schedulers are stepped by the trainer once per epoch after
  ``on_epoch_end``; a method that wants another rhythm writes ``param_group['lr']`` itself
  from a value kept in ``state_tensors``.
- randomness: the trainer re-seeds torch, numpy and ``random`` at the start of every epoch
  from (seed, epoch, rank), so a method just draws from the global generators.

Backward passes go through ``ctx.backward_step(loss, optimizers, name)``: it refuses a
non-finite loss (:class:`NonFiniteLossError`, raised before any weight changes), handles the
fp16 GradScaler, averages the gradients over processes in a torchrun job and steps the
given optimisers. A method with an alternating schedule (HFAH: label, text, image,
discriminator steps) simply calls it once per sub-step with that sub-step's optimisers.

Built-in methods live in ``cmhash.training.methods.<name>`` and register themselves with
``@register_method("<name>")``; :func:`get_method` imports that module on first use.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from cmhash.text import Vocabulary

from . import distributed
from .config import MethodConfig
from .errors import NonFiniteLossError

__all__ = [
    "Batch",
    "DatasetInfo",
    "HashingMethod",
    "MethodConfig",
    "StepContext",
    "get_method",
    "list_methods",
    "register_method",
]

BUILTIN_PACKAGE = "cmhash.training.methods"


class Batch(NamedTuple):
    """One training batch, already on the training device."""

    image: Tensor  # preprocessed images, float (B, 3, H, W)
    text: Tensor  # bag-of-words, float (B, text_dim)
    labels: Tensor  # multi-hot, float (B, n_labels)
    index: Tensor  # int64 (B,): positions in the training set, for per-sample buffers


@dataclass
class DatasetInfo:
    """What a method may know about the training data when it is built (from the data layer)."""

    n_train: int
    n_labels: int
    text_dim: int  # bag-of-words size
    train_labels: Tensor  # float (n_train, n_labels), multi-hot, row i = training item i
    label_names: list[str] = field(default_factory=list)
    image_size: int = 224
    preprocessing: dict[str, Any] = field(default_factory=dict)  # resize, crop, mean, std, ... (for export)
    # cmhash.text.Vocabulary.to_dict(): terms in column order and the tokenisation rules,
    # saved with checkpoints and carried into bundles so inference tokenises as training did
    vocabulary: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        shape = (self.n_train, self.n_labels)
        if tuple(self.train_labels.shape) != shape:
            raise ValueError(f"DatasetInfo.train_labels has shape {tuple(self.train_labels.shape)}, expected {shape}")
        if self.label_names and len(self.label_names) != self.n_labels:
            raise ValueError(f"DatasetInfo has {len(self.label_names)} label names for {self.n_labels} labels")
        if self.vocabulary is not None and Vocabulary.from_dict(self.vocabulary).dim != self.text_dim:
            raise ValueError(f"DatasetInfo's vocabulary does not have text_dim={self.text_dim} terms")


class StepContext:
    """What a method's hooks get from the trainer: device, precision, collectives, counters."""

    def __init__(self, device: torch.device, env: distributed.DistEnv, amp_dtype: torch.dtype | None) -> None:
        self.device = device
        self.rank = env.rank
        self.world_size = env.world_size
        self.amp_dtype = amp_dtype  # None: full precision
        # fp16 needs loss scaling; bf16 has float32's range and does not.
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        self.epoch = 0
        self.step = 0  # within the epoch
        self.global_step = 0
        self._train_batches: Callable[[], Iterator[Batch]] | None = None
        self._sync_sample_buffers: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision around forward passes when ``train.amp`` is on (CUDA); otherwise a no-op."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def backward_step(
        self,
        loss: torch.Tensor,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        name: str = "loss",
        terms: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Clear the optimisers' gradients, backpropagate ``loss``, average gradients over
        processes and step the optimisers.

        Raises :class:`NonFiniteLossError` (on every process at once) before any weight
        changes when ``loss`` or one of the named ``terms`` is not finite; the error names
        the first such term, else ``name``.
        """
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        self._check_finite(name, {**(terms or {}), name: loss})
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.world_size > 1:
            params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
            distributed.average_gradients(params, self.world_size)
        for opt in optimizers:
            if self.scaler is not None:
                self.scaler.step(opt)  # skips the step when fp16 gradients overflowed
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()

    def _check_finite(self, where: str, values: Mapping[str, torch.Tensor]) -> None:
        names = list(values)  # the named terms first: they say more than the total
        stacked = torch.stack([values[n].detach().float().reshape(()) for n in names])
        bad = (~torch.isfinite(stacked)).float()
        if self.world_size > 1:  # all processes must stop together, or the others hang
            distributed.all_reduce_(bad, "max")
        if bad.any():
            i = int(bad.nonzero()[0])
            raise NonFiniteLossError(
                names[i], float(stacked[i]), f"backward step {where!r}",
                self.epoch + 1, self.step + 1, self.global_step + 1, self.rank,
            )

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce over processes ('sum', 'mean', 'max', 'min'); a no-op in one process."""
        if self.world_size > 1:
            distributed.all_reduce_(tensor, op)
        return tensor

    def sync_sample_buffers(self) -> None:
        """Make row i of every ``method.sample_buffers()`` tensor the row written by the process
        that processed sample i (in this epoch, or in ``on_fit_start``'s pass).

        The trainer does this itself after ``on_fit_start`` and before ``on_epoch_end``; call it
        inside a hook only when all rows are needed earlier. A no-op in one process.
        """
        self._sync_sample_buffers()

    def train_batches(self) -> Iterator[Batch]:
        """One pass over this process's shard of the training set (only inside ``on_fit_start``)."""
        if self._train_batches is None:
            raise RuntimeError("ctx.train_batches() is only available inside on_fit_start")
        return self._train_batches()


class HashingMethod(abc.ABC):
    """A cross-modal hashing method: its networks, state, optimisers and training step.

    Subclasses set ``Config`` to a :class:`MethodConfig` subclass (a dataclass with defaults;
    a ``__post_init__`` of their own must call ``super().__post_init__()``), call
    ``super().__init__(config, info)`` first and build everything in ``__init__`` (on CPU;
    the trainer moves the method with :meth:`to`).
    """

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    name: ClassVar[str] = ""  # set by @register_method

    def __init__(self, config: MethodConfig, info: DatasetInfo) -> None:
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.info = info

    @classmethod
    def image_preprocessing(cls, config: MethodConfig) -> dict[str, Any]:
        """The image preprocessing (``data.transforms.preprocess_config``) of the image tower
        ``config`` describes, known before the method is built: the data layer needs it to
        make the datasets. The default reads the backbone name in ``config.backbone`` and its
        pretrained weights in ``config.pretrained`` (whose own preprocessing then applies)."""
        backbone = getattr(config, "backbone", None)
        if not isinstance(backbone, str):
            raise NotImplementedError(f"{cls.__name__} has no 'backbone' in its config; override image_preprocessing")
        from .blocks.backbones import backbone_preprocess

        return backbone_preprocess(backbone, getattr(config, "pretrained", None))

    @classmethod
    def fetch_pretrained(cls, config: MethodConfig) -> Any:
        """Find the pretrained backbone weights ``config.pretrained`` names in the library's
        cache, or download them (online only), before any data are read: a missing or unknown
        tag is a :class:`~cmhash.training.errors.PretrainedWeightsError` now, not after an hour
        of data loading. Returns the resolved weights, or None without ``config.pretrained``."""
        backbone, pretrained = getattr(config, "backbone", None), getattr(config, "pretrained", None)
        if not isinstance(backbone, str) or pretrained is None:
            return None
        from .blocks.backbones import resolve_backbone_weights

        return resolve_backbone_weights(backbone, pretrained)

    # -- what is saved -----------------------------------------------------------------

    @abc.abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Every module with weights or buffers, by a stable name (checkpoint keys are 'name.param')."""

    def state_tensors(self) -> dict[str, Tensor]:
        """Non-module training state (code matrix B, banks, scalars as 0-d tensors), by name."""
        return {}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Replace the state with ``tensors`` (same names as :meth:`state_tensors`, already on the device)."""
        if tensors:
            raise NotImplementedError(f"{type(self).__name__} has no state tensors but was given {sorted(tensors)}")

    def sample_buffers(self) -> dict[str, Tensor]:
        """Tensors whose row i is written when sample i is in a batch (first dim n_train).

        In a torchrun job each process sees a different shard of the samples; the trainer
        overwrites these tensors in place before ``on_epoch_end`` (and after ``on_fit_start``;
        or whenever the method calls ``ctx.sync_sample_buffers()``) so that every process holds
        row i from the process that processed sample i. Numeric dtypes, on the training device
        (under NCCL collectives need CUDA tensors; :meth:`to` moves state tensors there).
        """
        return {}

    @abc.abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimisers, by name; created once in ``__init__``."""

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Learning-rate schedulers, by name; the trainer steps each once per epoch after ``on_epoch_end``."""
        return {}

    # -- training ----------------------------------------------------------------------

    def on_fit_start(self, ctx: StepContext) -> None:
        """Once before the first epoch of a fresh run (not on resume). ``ctx.train_batches()`` is available."""

    def on_epoch_start(self, epoch: int, ctx: StepContext) -> None:
        """Start of epoch ``epoch`` (0-based), after the trainer put every module in train mode."""

    @abc.abstractmethod
    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, float | Tensor]:
        """One iteration: forward, ``ctx.backward_step`` for each (sub-)step; returns loss terms to log."""

    def on_epoch_end(self, epoch: int, ctx: StepContext) -> dict[str, float]:
        """End of epoch ``epoch`` (sample buffers already synchronised); returns extra values to log."""
        return {}

    # -- inference ---------------------------------------------------------------------

    @abc.abstractmethod
    def image_tower(self) -> nn.Module:
        """Preprocessed images (N, 3, H, W) -> tanh codes (N, bits). No labels, no training-only parts."""

    @abc.abstractmethod
    def text_tower(self) -> nn.Module:
        """Bag-of-words (N, text_dim) -> tanh codes (N, bits). No labels, no training-only parts."""

    def image_backbone(self) -> nn.Module | None:
        """The image tower's backbone (an ``ImageBackbone``), if it has one: with a frozen
        backbone, ``data.feature_cache`` feeds its precomputed features instead of images."""
        return None

    def pretrained_provenance(self) -> dict[str, Any] | None:
        """The weights the image backbone started from (library, model, tag, file, sha256),
        recorded in checkpoints and bundles; None when it started from random weights."""
        return getattr(self.image_backbone(), "provenance", None)

    # -- placement ---------------------------------------------------------------------

    def to(self, device: torch.device | str) -> HashingMethod:
        """Move modules and state tensors to ``device``. Optimisers keep working: modules move in place."""
        for module in self.modules().values():
            module.to(device)
        state = self.state_tensors()
        if state:
            self.load_state_tensors({k: v.to(device) for k, v in state.items()})
        return self


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[HashingMethod]] = {}


def register_method(name: str) -> Callable[[type[HashingMethod]], type[HashingMethod]]:
    """Class decorator: make a HashingMethod subclass available as ``get_method(name)``."""

    def decorate(cls: type[HashingMethod]) -> type[HashingMethod]:
        if not (isinstance(cls, type) and issubclass(cls, HashingMethod)):
            raise TypeError(f"@register_method({name!r}) needs a HashingMethod subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _builtin_names() -> list[str]:
    """Module names under cmhash.training.methods (not imported)."""
    try:
        spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    except ModuleNotFoundError:
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations) if not m.name.startswith("_")]


def list_methods() -> list[str]:
    """Names get_method accepts: registered methods and built-in method modules."""
    return sorted(set(_REGISTRY) | set(_builtin_names()))


def get_method(name: str) -> type[HashingMethod]:
    """The method class registered as ``name`` (importing the built-in module of that name if needed)."""
    if name not in _REGISTRY and name in _builtin_names():
        importlib.import_module(f"{BUILTIN_PACKAGE}.{name}")
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_methods()) or "(none)"
        raise ValueError(f"unknown method {name!r}; registered methods: {known}") from None
