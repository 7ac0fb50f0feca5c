"""What the online stages (ppo, grpo) share: sampling completions, the generation length, each
process's prompts for a step, the optimizer updates one pass over a step's samples takes, and the
step loop (`drive`) with its resume, log windows, checkpoints and held-out measure."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence, TypeVar

import torch
from torch import nn

from runtime.contract.config import StageSpec
from runtime.core.data import IGNORE_INDEX, TrainRow, collate_rows, read_training_rows
from runtime.core.distributed import Dist, autocast
from runtime.core.loop import StageLog, checkpoint_if_due, resume
from runtime.core.run import Run

T = TypeVar("T")


def sample(actor: nn.Module, prompts: list[tuple[int, ...]], stage: StageSpec, *, pad_id: int, eos_id: int | None,
           max_new_tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Sample one completion per prompt and lay each out right-padded: prompt, completion up to and
    including the first end-of-sequence token, padding. Labels mark the completion."""
    g = stage.params["generation"]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's next token is generated at one column
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    was_training = actor.training
    actor.eval()
    try:
        with torch.no_grad():
            generated = actor.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
                do_sample=g["do_sample"], temperature=g["temperature"], top_k=g["top_k"], top_p=g["top_p"],
                pad_token_id=pad_id, eos_token_id=eos_id,
            )
    finally:
        actor.train(was_training)
    rows = []
    for i, p in enumerate(prompts):
        new = generated[i, width:].tolist()
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        if not new:  # an empty completion has nothing to score; keep one token so every row counts
            new = [eos_id if eos_id is not None else pad_id]
        rows.append(TrainRow(tuple(p) + tuple(new), (IGNORE_INDEX,) * len(p) + tuple(new), i))
    return collate_rows(rows, pad_id)


def generation_length(stage: StageSpec, train_file: Path) -> int:
    """The recipe's max_new_tokens, or for "auto" the longest completion in the stage's data."""
    wanted = stage.params["generation"]["max_new_tokens"]
    if isinstance(wanted, int):
        return wanted
    rows = read_training_rows(train_file)
    longest = max((sum(1 for t in r.labels if t != IGNORE_INDEX) for r in rows), default=0)
    return longest or 64


def step_share(items: Sequence[T], per_process: int, step: int, d: Dist, seed: int) -> list[T]:
    """This process's `per_process` items for one step: a seeded shuffle per pass over the items,
    the processes taking consecutive slices so no two see the same item in a step."""
    begin = (step * d.world + d.rank) * per_process
    out = []
    for k in range(begin, begin + per_process):
        epoch, i = divmod(k, len(items))
        order = list(range(len(items)))
        random.Random(seed + epoch).shuffle(order)
        out.append(items[order[i]])
    return out


def updates_per_pass(samples: int, stage: StageSpec) -> int:
    """Optimizer steps of one pass over `samples` rows in micro-batches with gradient accumulation."""
    micro = -(-samples // stage.micro_batch_size)
    return -(-micro // stage.grad_accum)


@dataclass
class StepResult:
    """What one online step reports: its non-pad tokens, scalar means, and per-reward means."""

    tokens: int
    scalars: dict[str, float]
    rewards: dict[str, float] = field(default_factory=dict)


class OnlineStage(Protocol):
    steps: int

    def heldout(self) -> dict | None: ...

    def lr(self) -> float: ...

    def step(self, step: int, generator: torch.Generator) -> StepResult: ...

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...


@dataclass
class Driven:
    """How an online stage's run went: its log, its training time, its held-out before/after."""

    log: StageLog
    wall_s: float
    heldout: dict | None


def drive(run: Run, index: int, stage: StageSpec, online: OnlineStage) -> Driven:
    """Resume, train `online` step by step with the shared log and checkpoints, and measure the
    held-out sample before and after (rank 0). `policy_loss` is what the log shows as the loss."""
    # Under bf16/fp16 the frozen weights are half precision and the trainable ones fp32 masters:
    # sampling, scoring and updates all compute under autocast, as the shared loop's do.
    with autocast(run.config, run.device):
        before = online.heldout() if run.d.is_main else None
    start = resume(run, index, stage, online.steps, online)
    log = StageLog(run, index, stage, online.steps, start)
    step = start.step
    window: dict[str, float] = {}
    rewards: dict[str, float] = {}
    window_steps = window_tokens = 0
    while step < online.steps:
        # The update shuffle is seeded by the step, so a resumed run repeats it exactly.
        generator = torch.Generator().manual_seed(run.config.seed * 1_000_003 + step)
        with autocast(run.config, run.device):
            result = online.step(step, generator)
        step += 1
        window_steps += 1
        window_tokens += result.tokens
        for into, values in ((window, result.scalars), (rewards, result.rewards)):
            for key, value in values.items():
                into[key] = into.get(key, 0.0) + value
        if log.due(step):
            means = {k: round(v / window_steps, 5) for k, v in window.items()}
            extra = {"rewards": {k: round(v / window_steps, 5) for k, v in rewards.items()}} if rewards else {}
            log.record(step, window_tokens, lr=online.lr(), loss=means["policy_loss"], **means, **extra)
            window, rewards, window_steps, window_tokens = {}, {}, 0, 0
        else:
            log.tick(step)
        checkpoint_if_due(run, index, stage, log, online, step, epoch=0, batch=step)
    wall_s = log.close()
    heldout = None
    if run.d.is_main:
        with autocast(run.config, run.device):
            heldout = {"before": before, "after": online.heldout()}
        run.log(f"[{stage.name}] held out: {json.dumps(heldout, sort_keys=True)}")
    return Driven(log, wall_s, heldout)
