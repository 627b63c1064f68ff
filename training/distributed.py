"""torchrun support: process-group setup from the environment and the few collectives we use.

Gradients are synchronised by :func:`average_gradients` inside ``StepContext.backward_step``
rather than by wrapping modules in ``DistributedDataParallel``. The methods alternate
optimisers over subsets of their modules within one iteration (HFAH: label, text, image and
discriminator steps; frozen discriminators inside the text and image losses), and their
loss code calls the modules directly. DDP would need every method to call its wrapped
copies, ``find_unused_parameters`` for the alternation and care with modules used in
several backward passes per iteration. Averaging the gradients of exactly the parameters
an optimiser is about to step is the same mathematics (DDP averages too), works for any
schedule, and costs one flattened all-reduce per backward step; what it gives up is DDP's
overlap of communication with the backward pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when this module initialised the process group (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str, timeout_s: int) -> DistEnv:
    """Join the torchrun job described by RANK/WORLD_SIZE/LOCAL_RANK, if any (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, owns_group=True)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """Replace each ``p.grad`` by its mean over all processes (one all-reduce per dtype/device)."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            if p.grad.is_sparse:
                raise NotImplementedError("sparse gradients are not supported in distributed training")
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values."""
    for t in tensors:
        dist.broadcast(t.data, src)


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce with op 'sum', 'mean', 'max' or 'min'."""
    if op != "mean" and op not in _OPS:
        raise ValueError(f"all_reduce_: op must be 'sum', 'mean', 'max' or 'min', got {op!r}")
    dist.all_reduce(tensor, _OPS.get(op, dist.ReduceOp.SUM))
    return tensor.div_(dist.get_world_size()) if op == "mean" else tensor
