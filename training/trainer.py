"""The method-agnostic training loop: seeding, sharding, evaluation, logs, checkpoints, resume.

``Trainer(config, method, train_set, query_set, database_set).fit()``. Datasets are
map-style and yield ``(image, text, labels, index)`` with ``index`` the item's position in
the training set. The order of the hooks the trainer calls is described in
:mod:`cmhash.training.method`.

Reproducibility. The shuffling order of epoch ``e`` is a permutation drawn from a
``torch.Generator`` seeded from (seed, e); torch, numpy and ``random`` are re-seeded from
(seed, e, rank) at the start of every epoch. Everything else that changes is saved in the
``last`` checkpoint after each epoch, so a run resumed after a kill makes bitwise the same
steps as an uninterrupted one on CPU, given the same torch build and number of threads
(reductions split over threads add in another order); on CUDA as far as its kernels are
deterministic.

Distributed. Under ``torchrun`` each process takes every ``world_size``-th item of the
epoch's order (padded by wrapping around so all have the same number of batches), averages
gradients in ``ctx.backward_step`` (see :mod:`cmhash.training.distributed` for why not DDP),
and syncs the method's per-sample buffers before ``on_epoch_end``. Only rank 0 evaluates,
logs and writes checkpoints; the others wait for it at the end of each epoch.

Outputs in ``train.out_dir``: ``last/`` and ``best/`` checkpoints (:mod:`.checkpoint`),
``metrics.jsonl`` and ``metrics.csv`` (one row per epoch), ``tb/`` (TensorBoard events,
when tensorboard is installed).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import cmhash
from cmhash.files import atomic_write
from cmhash.cpus import available_cpus
from cmhash.errors import CmhashError
from cmhash.metrics import mean_average_precision

from . import checkpoint as ckpt_io
from . import distributed
from .config import RunConfig
from .errors import ConfigError, NonFiniteLossError
from .method import Batch, DatasetInfo, HashingMethod, StepContext, get_method

log = logging.getLogger("cmhash.training")
PLAIN_PROGRESS_SECONDS = 30.0  # between progress lines when stderr is not a terminal

# Purposes mixed into derived seeds, so that no two random streams coincide.
_SHUFFLE, _STEP, _LOADER, _FIT_START = 1, 2, 3, 4


# --------------------------------------------------------------------------- seeding


def derive_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed from ``seed`` and integer keys (epoch, rank, purpose), well mixed."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint32)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def fit_torch_threads() -> None:
    """No more torch threads than CPUs this process may use (affinity mask, cgroup quota):
    more only wait for each other. A smaller count set by the user (``OMP_NUM_THREADS``,
    ``torch.set_num_threads``) is kept."""
    cpus = available_cpus()
    if torch.get_num_threads() > cpus:
        torch.set_num_threads(cpus)
    if torch.get_num_interop_threads() > cpus:
        with contextlib.suppress(RuntimeError):  # settable only before the first inter-op work
            torch.set_num_interop_threads(cpus)


def build_method(config: RunConfig, info: DatasetInfo) -> HashingMethod:
    """Seed with ``train.seed`` and build the configured method (the same weights on every run)."""
    seed_everything(config.train.seed)
    return get_method(config.method)(config.model, info)


# --------------------------------------------------------------------------- trainer


@torch.inference_mode()
def encode_dataset(method: HashingMethod, dataset: Dataset, device: torch.device, batch_size: int = 256,
                   num_workers: int = 0, progress: bool = False, what: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed image codes, packed text codes and labels of every item of ``dataset``
    (the towers as they are: callers put them in eval mode)."""
    image_tower, text_tower = method.image_tower(), method.text_tower()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    image_codes, text_codes, labels = [], [], []
    # Full precision on purpose: the exported towers run in float32, and signs near 0 must agree.
    for image, text, label, _ in tqdm(loader, desc=f"encode {what}", unit="batch", disable=not progress, leave=False):
        image_codes.append(cmhash.pack_codes(image_tower(image.to(device)).float().cpu().numpy(), input="sign"))
        text_codes.append(cmhash.pack_codes(text_tower(text.to(device).float()).float().cpu().numpy(), input="sign"))
        labels.append(label.numpy())
    return np.concatenate(image_codes), np.concatenate(text_codes), np.concatenate(labels)


@dataclass
class FitResult:
    out_dir: Path
    history: list[dict[str, Any]]  # one row per epoch, as in metrics.jsonl
    best: dict[str, Any] | None  # epoch and mAPs of the best evaluation (None without evaluation)
    last: dict[str, Any]  # the last epoch's row


def _to_batch(items: Sequence[torch.Tensor], device: torch.device) -> Batch:
    if len(items) != 4:
        raise ValueError(f"training items must be (image, text, labels, index), got a tuple of {len(items)}")
    image, text, labels, index = (t.to(device, non_blocking=True) for t in items)
    return Batch(image=image, text=text.float(), labels=labels.float(), index=index.long())


class Trainer:
    """Trains ``method`` as ``config.train`` says; see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        method: HashingMethod,
        train_set: Dataset,
        query_set: Dataset | None = None,
        database_set: Dataset | None = None,
    ) -> None:
        if method.config != config.model:
            raise ConfigError("the method was built from another model config than config.model; use build_method(config, info)")
        if method.name != config.method:
            raise ConfigError(f"config.method is {config.method!r} but the method is {method.name or type(method).__name__!r}")
        if len(train_set) < int(os.environ.get("WORLD_SIZE", "1")):
            raise ValueError(f"{len(train_set)} training items cannot be shared by {os.environ['WORLD_SIZE']} processes")
        if len(train_set) != method.info.n_train:
            raise ValueError(f"the training set has {len(train_set)} items but DatasetInfo.n_train is {method.info.n_train}")
        if (query_set is None) != (database_set is None):
            raise ValueError("evaluation needs both a query set and a database set (or neither)")
        self.config = config
        self.method = method
        self.train_set, self.query_set, self.database_set = train_set, query_set, database_set
        tc = config.train

        device = _pick_device(tc.device)
        self.env = distributed.setup(device.type, tc.dist_timeout_s)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.env.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        fit_torch_threads()
        if tc.num_workers > available_cpus():  # not capped: the worker count decides the augmentation streams
            log.warning("train.num_workers=%d but this process may use %d CPUs: the workers will compete",
                        tc.num_workers, available_cpus())
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        amp_dtype = getattr(torch, tc.amp_dtype) if tc.amp and device.type == "cuda" else None
        self.ctx = StepContext(device, self.env, amp_dtype)
        self.out_dir = Path(tc.out_dir)
        # a bar on a terminal; elsewhere (a log, nohup, a notebook's subprocess) a plain line
        # every PLAIN_PROGRESS_SECONDS, so a long epoch is never silent
        self.show_progress = tc.progress and self.env.is_main and sys.stderr.isatty()
        self.plain_progress = tc.progress and self.env.is_main and not self.show_progress

        method.to(device)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.start_epoch = 0
        resume_path = self._resume_path()
        if resume_path is not None:
            self._load(resume_path)
        if self.env.world_size > 1:  # every process starts from rank 0's weights and state
            modules = method.modules().values()
            distributed.broadcast_([t for m in modules for t in (*m.parameters(), *m.buffers())])
            distributed.broadcast_(method.state_tensors().values())
        self._writer = None

    # -- public ------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train from ``start_epoch`` to ``train.epochs``; returns the history and the best result."""
        tc, ctx = self.config.train, self.ctx
        try:
            if self.env.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._writer = _tensorboard(self.out_dir / "tb", ctx.global_step)
            if self.start_epoch == 0 and not self.history:
                self._fit_start()
            for epoch in range(self.start_epoch, tc.epochs):
                row = self._train_epoch(epoch)
                if self._eval_due(epoch):
                    row.update(self._evaluate())
                self.history.append(row)
                if self.env.is_main:
                    self._after_epoch(epoch, row)
                if self.env.world_size > 1:
                    dist.barrier()
            last = self.history[-1] if self.history else {}
            return FitResult(out_dir=self.out_dir, history=list(self.history), best=self.best, last=last)
        finally:
            if self._writer is not None:
                self._writer.close()
            distributed.teardown(self.env)

    # -- epochs ------------------------------------------------------------------------

    def _epoch_shard(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's item order for ``epoch``, and the items whose buffer rows it owns."""
        n, world, rank = len(self.train_set), self.env.world_size, self.env.rank
        generator = torch.Generator().manual_seed(derive_seed(self.config.train.seed, _SHUFFLE, epoch))
        order = torch.randperm(n, generator=generator)
        per_rank = math.ceil(n / world)
        padded = torch.cat([order, order[: per_rank * world - n]])  # equal batch counts on all ranks
        return padded[rank::world], order[rank::world]

    def _loader(self, indices: torch.Tensor, epoch: int, purpose: int) -> DataLoader:
        tc = self.config.train
        generator = torch.Generator().manual_seed(derive_seed(tc.seed, purpose, epoch, self.env.rank))
        return DataLoader(
            self.train_set,
            batch_size=tc.batch_size,
            sampler=indices.tolist(),
            num_workers=tc.num_workers,
            generator=generator,  # worker seeds, so augmentation is reproducible too
            pin_memory=self.device.type == "cuda",
        )

    def _fit_start(self) -> None:
        seed_everything(derive_seed(self.config.train.seed, _FIT_START, self.env.rank))
        shard, owned = self._epoch_shard(0)
        loader = self._loader(shard, 0, _FIT_START)
        self.ctx._train_batches = lambda: (_to_batch(items, self.device) for items in loader)
        self.ctx._sync_sample_buffers = lambda: self._combine_sample_rows(owned)
        try:
            self.method.on_fit_start(self.ctx)
        finally:
            self.ctx._train_batches = None
        self.ctx.sync_sample_buffers()

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        tc, method, ctx = self.config.train, self.method, self.ctx
        started = time.perf_counter()
        seed_everything(derive_seed(tc.seed, _STEP, epoch, self.env.rank))
        shard, owned = self._epoch_shard(epoch)
        loader = self._loader(shard, epoch, _LOADER)
        ctx.epoch, ctx.step = epoch, 0
        ctx._sync_sample_buffers = lambda: self._combine_sample_rows(owned)
        for module in method.modules().values():
            module.train()
        method.on_epoch_start(epoch, ctx)
        lrs = {f"lr/{name}": opt.param_groups[0]["lr"] for name, opt in method.optimizers().items()}

        sums: dict[str, float] = {}
        bar = tqdm(total=len(shard), unit="item", desc=f"epoch {epoch + 1}/{tc.epochs}",
                   disable=not self.show_progress, dynamic_ncols=True, leave=False)
        seen, report_at = 0, started + PLAIN_PROGRESS_SECONDS
        with bar:
            for items in loader:
                batch = _to_batch(items, self.device)
                logs = method.train_step(batch, ctx)
                values = {name: float(v) for name, v in logs.items()}
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + value
                ctx.step += 1
                ctx.global_step += 1
                bar.update(len(batch.index))
                seen += len(batch.index)
                if self.plain_progress and time.perf_counter() >= report_at:
                    report_at = time.perf_counter() + PLAIN_PROGRESS_SECONDS
                    rate = seen / (time.perf_counter() - started)
                    log.info("epoch %d/%d: %d/%d items, %.1f items/s, ETA %.0f s", epoch + 1, tc.epochs, seen,
                             len(shard), rate, (len(shard) - seen) / rate)
                if ctx.global_step % tc.log_every == 0:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in list(values.items())[:4]}, refresh=False)
                    if self._writer is not None:
                        for name, value in values.items():
                            self._writer.add_scalar(f"step/{name}", value, ctx.global_step)

        losses = self._mean_over_processes(sums, ctx.step)
        for name, value in losses.items():  # a logged term that was never part of a backward loss
            if not math.isfinite(value):
                raise NonFiniteLossError(name, value, "the epoch mean", epoch + 1, ctx.step, ctx.global_step, self.env.rank)
        ctx.sync_sample_buffers()
        extra = method.on_epoch_end(epoch, ctx) or {}
        for scheduler in method.schedulers().values():
            scheduler.step()
        if self.env.world_size > 1:  # e.g. BatchNorm running stats: keep rank 0's everywhere
            distributed.broadcast_([b for m in method.modules().values() for b in m.buffers()])
        row: dict[str, Any] = {"epoch": epoch + 1, "global_step": ctx.global_step}
        row.update({f"loss/{k}": v for k, v in losses.items()})
        row.update({k: float(v) for k, v in extra.items()})
        row.update(lrs)
        row["seconds"] = round(time.perf_counter() - started, 3)
        return row

    def _mean_over_processes(self, sums: dict[str, float], steps: int) -> dict[str, float]:
        if self.env.world_size == 1:
            return {k: v / max(steps, 1) for k, v in sums.items()}
        names = sorted(sums)
        # On the training device: NCCL reduces CUDA tensors only.
        t = torch.tensor([sums[n] for n in names] + [float(steps)], dtype=torch.float64, device=self.device)
        distributed.all_reduce_(t, "sum")
        total = t.cpu()
        return {n: float(total[i] / max(total[-1], 1.0)) for i, n in enumerate(names)}

    def _combine_sample_rows(self, owned: torch.Tensor) -> None:
        """Row i of each per-sample buffer from the process that processed sample i."""
        if self.env.world_size == 1:
            return
        for name, buffer in self.method.sample_buffers().items():
            if buffer.shape[0] != len(self.train_set):
                raise ValueError(f"sample buffer {name!r} has {buffer.shape[0]} rows for {len(self.train_set)} training items")
            mine = torch.zeros(buffer.shape[0], dtype=torch.bool, device=buffer.device)
            mine[owned.to(buffer.device)] = True
            buffer.masked_fill_(~mine.view(-1, *([1] * (buffer.dim() - 1))), 0)
            distributed.all_reduce_(buffer, "sum")

    # -- evaluation --------------------------------------------------------------------

    def _eval_due(self, epoch: int) -> bool:
        if self.query_set is None or not self.env.is_main:
            return False
        every = self.config.train.eval_every
        return epoch + 1 == self.config.train.epochs or (every > 0 and (epoch + 1) % every == 0)

    def _encode(self, dataset: Dataset, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return encode_dataset(self.method, dataset, self.device, self.config.eval.batch_size,
                              self.config.train.num_workers, progress=self.show_progress, what=what)

    def _evaluate(self) -> dict[str, float]:
        started = time.perf_counter()
        towers = (self.method.image_tower(), self.method.text_tower())
        modes = [t.training for t in towers]
        for tower in towers:
            tower.eval()
        try:
            q_img, q_txt, q_lab = self._encode(self.query_set, "query")
            d_img, d_txt, d_lab = self._encode(self.database_set, "database")
        finally:
            for tower, mode in zip(towers, modes):
                tower.train(mode)
        k = self.config.eval.map_k
        i2t = mean_average_precision(q_img, d_txt, q_lab, d_lab, k=k)
        t2i = mean_average_precision(q_txt, d_img, q_lab, d_lab, k=k)
        return {"map_i2t": i2t, "map_t2i": t2i, "map_mean": (i2t + t2i) / 2,
                "eval_seconds": round(time.perf_counter() - started, 3)}

    # -- rank 0: logs and checkpoints --------------------------------------------------

    def _after_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        tc = self.config.train
        improved = "map_mean" in row and (self.best is None or row["map_mean"] > self.best["map_mean"])
        if improved:
            self.best = {k: row[k] for k in ("epoch", "map_i2t", "map_t2i", "map_mean")}
            self._save(self.out_dir / "best")
        if (epoch + 1) % tc.save_every == 0 or epoch + 1 == tc.epochs:
            self._save(self.out_dir / "last")
        self._write_metrics()
        if self._writer is not None:
            for name, value in row.items():  # x axis: global step, so a resume's purge_step applies
                if name != "global_step":
                    self._writer.add_scalar(f"epoch/{name}", value, row["global_step"])
            self._writer.flush()
        summary = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k.startswith(("loss/", "map_")))
        log.info("epoch %d/%d: %s", epoch + 1, tc.epochs, summary)

    def _write_metrics(self) -> None:
        """metrics.jsonl and metrics.csv, rewritten from the history (so a resume leaves no stale rows)."""
        columns: list[str] = []
        for row in self.history:
            columns.extend(k for k in row if k not in columns)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write(self.out_dir / "metrics.csv", text.getvalue().encode())
        atomic_write(self.out_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in self.history).encode())

    def _save(self, path: Path) -> None:
        method, info = self.method, self.method.info
        model = {f"{name}.{k}": v for name, module in method.modules().items() for k, v in module.state_dict().items()}
        state = {f"method/{k}": v for k, v in method.state_tensors().items()}
        meta = {
            "method": self.config.method,
            "config": self.config.to_dict(),
            "epoch": self.history[-1]["epoch"],
            "global_step": self.ctx.global_step,
            "world_size": self.env.world_size,
            "history": self.history,
            "best": self.best,
            "bits": self.config.model.bits,
            "n_train": info.n_train,
            "n_labels": info.n_labels,
            "label_names": list(info.label_names),
            "text_dim": info.text_dim,
            "vocabulary": info.vocabulary,
            "image_size": info.image_size,
            "preprocessing": info.preprocessing,
            "pretrained": method.pretrained_provenance(),  # the weights the backbone started from, or None
            "modules": sorted(method.modules()),
            "versions": {"cmhash": cmhash.__version__, "torch": torch.__version__, "python": platform.python_version()},
            "optimizers": ckpt_io.flatten({k: o.state_dict() for k, o in method.optimizers().items()}, "optim", state),
            "schedulers": ckpt_io.flatten({k: s.state_dict() for k, s in method.schedulers().items()}, "sched", state),
            "scaler": ckpt_io.flatten(self.ctx.scaler.state_dict() if self.ctx.scaler else None, "scaler", state),
        }
        ckpt_io.write_checkpoint(path, model, state, meta)

    # -- resume ------------------------------------------------------------------------

    def _resume_path(self) -> Path | None:
        tc = self.config.train
        if tc.resume_from is not None:
            return Path(tc.resume_from)  # must exist: read_checkpoint says so if it does not
        if tc.resume:
            last = self.out_dir / "last"
            if ckpt_io.exists(last):
                return last
            log.info("train.resume: no checkpoint at %s yet, starting from scratch", last)
        return None

    def _load(self, path: Path) -> None:
        ckpt = ckpt_io.read_checkpoint(path)
        meta, method = ckpt.meta, self.method
        if meta["method"] != self.config.method:
            raise ConfigError(f"checkpoint {ckpt.path} is of method {meta['method']!r}, not {self.config.method!r}")
        saved, current = meta["config"]["model"], self.config.model.to_dict()
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            raise ConfigError(
                f"cannot resume from {ckpt.path}: the model config differs in "
                + ", ".join(f"model.{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in changed)
            )
        modules = method.modules()
        if sorted(modules) != meta["modules"]:
            raise ckpt_io.CheckpointError(f"checkpoint modules {meta['modules']} do not match the method's {sorted(modules)}")
        for name, module in modules.items():
            module.load_state_dict(ckpt.module_state(name), strict=True)
        method.load_state_tensors({k: v.to(self.device) for k, v in ckpt.method_state().items()})
        _load_named(method.optimizers(), ckpt.restore("optimizers"), "optimizers")
        _load_named(method.schedulers(), ckpt.restore("schedulers"), "schedulers")
        scaler_state = ckpt.restore("scaler")
        if self.ctx.scaler is not None and scaler_state is not None:
            self.ctx.scaler.load_state_dict(scaler_state)
        self.history = list(meta["history"])
        self.best = meta["best"]
        self.start_epoch = meta["epoch"]
        self.ctx.global_step = meta["global_step"]
        log.info("resumed from %s after epoch %d (global step %d)", ckpt.path, self.start_epoch, self.ctx.global_step)


def _load_named(objects: Mapping[str, Any], states: Mapping[str, Any], what: str) -> None:
    if sorted(objects) != sorted(states):
        raise ckpt_io.CheckpointError(f"checkpoint {what} {sorted(states)} do not match the method's {sorted(objects)}")
    for name, obj in objects.items():
        obj.load_state_dict(states[name])


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def _tensorboard(path: Path, purge_step: int):
    """A SummaryWriter when tensorboard is installed, else None. purge_step drops events a resume redoes."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path), purge_step=purge_step or None)
