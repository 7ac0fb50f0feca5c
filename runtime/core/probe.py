"""The longest batch first: one forward and backward pass on the largest micro-batch an epoch
will see, before the first real step, so a run that does not fit fails in its first minute
instead of hours in, when a few long samples finally meet in one batch.

The probe leaves no trace on training: its gradients are dropped, and the random number
generators (torch, Python, NumPy) are restored afterwards, so dropout draws the same masks in the
real steps and the weights after N steps equal those of a run without it. It runs on the plain
model, before the backend wraps it (DDP's reducer and DeepSpeed's gradient buckets would keep the
probe's gradients), which also means the optimizer state, created at the first step, is not yet
part of its peak. DeepSpeed builds are not probed: the engine casts the model when it is built,
so a peak taken before would not be the run's.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from runtime.core.checkpoint import rng_restored
from runtime.core.distributed import autocast, peak_memory_gib
from runtime.core.host_memory import peak_rss_gib


class ProbeOutOfMemory(Exception):
    """The longest micro-batch does not fit; the message gives the measured need, the plan's
    breakdown and the fixes."""


def longest_micro_batch(rows: Sequence[Any], groups: Sequence[Sequence[Sequence[int]]]) -> list[int]:
    """The micro-batch of an epoch's step groups with the most token slots after collation
    (rows x the longest row, as padding makes it), the most real tokens among equals: with packing,
    where every pack pads to one budget, the fullest pack."""
    micro_batches = [micro for group in groups for micro in group]
    return max(micro_batches, key=lambda micro: (len(micro) * max(len(rows[j]) for j in micro),
                                                 sum(len(rows[j]) for j in micro)))


def measured_peak_gib(device: torch.device) -> float:
    """torch's peak allocation on a GPU; the process's resident-set high-water mark on CPU."""
    return peak_memory_gib(device) if device.type == "cuda" else round(peak_rss_gib(), 3)


def probe_peak_gib(config, device: torch.device, model: nn.Module, loss: nn.Module,
                   batch: dict[str, torch.Tensor]) -> float:
    """One forward and backward pass of `loss` on `batch`, its gradients dropped; the peak memory
    it reached. Raises ProbeOutOfMemory (with the measured figure) when it does not fit."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with rng_restored(device):
            with autocast(config, device):
                out = loss(**batch)
            (out[0] / out[1].clamp(min=1)).backward()
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise ProbeOutOfMemory(str(exc).split("\n")[0]) from None
    finally:
        model.zero_grad(set_to_none=True)  # the first real step starts from no gradient, as without the probe
    return measured_peak_gib(device)


def out_of_memory_message(stage: str, micro: Sequence[int], tokens: int, measured: str, device: torch.device,
                          breakdown: dict[str, float] | None, planned_peak: float | None) -> str:
    """One line: what did not fit, the plan's figures beside it, and what to change."""
    plan = ", ".join(f"{name} {gib:.2f}" for name, gib in sorted((breakdown or {}).items()) if gib)
    planned = f"the plan's peak is {planned_peak:.2f} GiB ({plan})" if planned_peak is not None else "no planned peak"
    where = f"{torch.cuda.memory_allocated(device) / 1024**3:.2f} GiB allocated" if device.type == "cuda" else "host"
    return (f'stage "{stage}": the longest micro-batch ({len(micro)} rows, {tokens} token slots) ran out of memory '
            f"before the first step ({where}: {measured}); {planned}; lower train.micro_batch_size (raise grad_accum "
            "to keep the batch), set hardware.gradient_checkpointing = true, use a LoRA adapter, or lower "
            "tokens.max_total")


def run_probe(run, stage, objective, groups: Sequence[Sequence[Sequence[int]]],
              plan_memory: Callable[[], tuple[dict[str, float] | None, float | None]]) -> float:
    """Probe `stage`'s longest micro-batch of `groups`; its peak in GiB. `plan_memory` gives the
    plan's breakdown and peak for the message when it does not fit."""
    rows = objective.rows
    micro = longest_micro_batch(rows, groups)
    batch = {key: value.to(run.device) for key, value in objective.collate([rows[j] for j in micro]).items()}
    try:
        peak = probe_peak_gib(run.config, run.device, objective.model, objective.loss.to(run.device), batch)
    except ProbeOutOfMemory as exc:
        breakdown, planned = plan_memory()
        tokens = int(batch["input_ids"].numel()) if "input_ids" in batch else 0
        raise ProbeOutOfMemory(out_of_memory_message(stage.name, micro, tokens, str(exc), run.device,
                                                     breakdown, planned)) from None
    run.log(f"[{stage.name}] longest micro-batch: {len(micro)} rows, peak {peak:.2f} GiB before the first step")
    return peak
