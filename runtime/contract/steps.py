"""How many optimizer steps a stage takes: one formula, used by the plan and by the runtime.

A step is one optimizer update. An epoch cuts the stage's rows into micro-batches; with several
processes each takes every `world`-th micro-batch, and the micro-batches left over after the last
full round are dropped so that every process takes the same number of steps; each process then
groups its micro-batches `grad_accum` at a time (the last group may be short).
"""

from __future__ import annotations

from runtime.contract.packing import pack


def micro_batches(n_rows: int, micro_batch_size: int) -> int:
    """Micro-batches one epoch cuts `n_rows` into (the last one may be short)."""
    return -(-n_rows // micro_batch_size)


def steps_per_epoch(n_rows: int, micro_batch_size: int, grad_accum: int, world: int) -> int:
    """Optimizer steps each process takes in one epoch over `n_rows` rows."""
    per_process = micro_batches(n_rows, micro_batch_size) // world
    return -(-per_process // grad_accum)


def total_steps(n_rows: int, micro_batch_size: int, grad_accum: int, world: int, *, epochs: int,
                max_steps: int | None) -> int:
    """Optimizer steps of a stage: `max_steps` when set, else epochs x steps per epoch."""
    if max_steps is not None:
        return max_steps
    return epochs * steps_per_epoch(n_rows, micro_batch_size, grad_accum, world)


def rollout_steps_per_epoch(n_prompts: int, rollout_batch_size: int, world: int) -> int:
    """Steps of an online stage (PPO) in one pass over its prompts: each step samples
    `rollout_batch_size` prompts on every process."""
    return -(-n_prompts // (rollout_batch_size * world))


def training_items(lengths: list[int], budget: int, *, packing: bool) -> int:
    """What one epoch batches: the training sequences, or with `packing` the packs they make
    (runtime.contract.packing); `total_steps` counts micro-batches of these."""
    if not packing:
        return len(lengths)
    return len(pack(lengths, budget))
