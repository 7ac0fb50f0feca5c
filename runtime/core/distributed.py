"""The processes of a run and the device each trains on.

One process, or several started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment):
gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from runtime.contract.config import RuntimeConfig


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device_type: str) -> Dist:
    """This process's place in the run; joins the process group when there are several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank)


def shutdown_distributed(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        gc.collect()  # engines and their hooks go before the process group does
        dist.destroy_process_group()


def select_device(config: RuntimeConfig, d: Dist) -> torch.device:
    """The device this process trains on: its own GPU (by local rank), or the CPU."""
    if config.hardware.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError('the build targets hardware.device = "cuda" but no GPU is visible')
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def autocast(config: RuntimeConfig, device: torch.device):
    """Mixed precision as planned (weights stay fp32); a no-op context for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.hardware.precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def all_ranks_sum(value: int, d: Dist, device: torch.device | None = None) -> int:
    """`value` summed over every process (collective: every rank calls it)."""
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(t)
    return int(t.item())


def all_ranks_max(value: int, d: Dist, device: torch.device | None = None) -> int:
    """The largest `value` of every process (collective: every rank calls it)."""
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """Whether `flag` is true on any process; a barrier too (collective: every rank calls it)."""
    t = torch.tensor([int(flag)], device=device)  # on the run's device: NCCL reduces CUDA tensors only
    if d.world > 1:
        dist.all_reduce(t)
    return bool(int(t.item()))


def peak_memory_gib(device: torch.device) -> float | None:
    """torch's peak allocation on a GPU; None on CPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1024**3, 3)
