"""The held-out loss during training (`eval_every_steps`), for the stages of the shared loop.

Every `eval_every_steps` steps (and after the last), the model's mean loss over a fixed sample of
the held-out rows, the first `HELDOUT_SAMPLE` in file order, so each evaluation measures the same
rows. Every rank takes its share of the batches and the sums are added up, which keeps DDP and
DeepSpeed in step. Dropout is off while it runs, and the random number generators are forked and
restored around it, so training continues exactly as it would have without it: a resumed run
stays bit-exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from runtime.contract.config import StageSpec
from runtime.core.distributed import Dist, autocast

HELDOUT_SAMPLE = 256  # held-out rows per evaluation


@dataclass
class HeldoutLoss:
    """Evaluates a stage's held-out loss at its cadence and remembers the best evaluation."""

    stage: StageSpec
    rows: Sequence[Any]
    collate: Callable[[Sequence[Any]], dict[str, torch.Tensor]]
    history: list[tuple[int, float]] = field(default_factory=list)

    def due(self, step: int, steps: int) -> bool:
        every = self.stage.eval_every_steps
        return bool(every and self.rows) and (step % every == 0 or step == steps)

    def best(self) -> tuple[int, float] | None:
        finite = [point for point in self.history if math.isfinite(point[1])]
        return min(finite, key=lambda point: (point[1], point[0])) if finite else None

    def measure(self, step: int, forward: Callable, model: torch.nn.Module, run) -> float:
        """The mean held-out loss now (collective: every rank calls it at the same step)."""
        d: Dist = run.d
        sample = list(self.rows[:HELDOUT_SAMPLE])
        size = self.stage.micro_batch_size
        batches = [sample[i : i + size] for i in range(0, len(sample), size)]
        mine = batches[d.rank :: d.world]
        rounds = math.ceil(len(batches) / d.world)  # the same number of forward passes on every rank
        devices = [run.device] if run.device.type == "cuda" else []
        totals = torch.zeros(2, dtype=torch.float64, device=run.device)
        was_training = model.training
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            for k in range(rounds):
                real = k < len(mine)
                batch = self.collate(mine[k] if real else batches[0])
                batch = {key: value.to(run.device) for key, value in batch.items()}
                with autocast(run.config, run.device):
                    out = forward(batch)
                if real:
                    totals[0] += out[0].detach().double()
                    totals[1] += float(out[1])
            model.train(was_training)
        if d.world > 1:
            dist.all_reduce(totals)
        loss = round(float(totals[0] / totals[1].clamp(min=1)), 5)
        self.history.append((step, loss))
        return loss
