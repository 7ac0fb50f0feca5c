"""The held-out loss during training (`eval_every_steps`), for the stages of the shared loop.

Every `eval_every_steps` steps (and after the last), the model's mean loss over a fixed sample of
the held-out rows, the first `HELDOUT_SAMPLE` in file order, so each evaluation measures the same
rows. Every rank takes its share of the batches and the sums are added up, which keeps DDP and
DeepSpeed in step. Dropout is off while it runs, and the random number generators are forked and
restored around it, so training continues exactly as it would have without it: a resumed run
stays bit-exact.

For a stage trained on the data a classification eval reads, each evaluation also measures the
accuracy on the first `ACCURACY_SAMPLE` held-out rows, predicted exactly as the final eval
predicts (runtime.core.classify.predict_labels: greedy generation and the recipe's extraction
rule). Every rank predicts the same rows, so no rank waits on another mid-generation (ZeRO-3
gathers the weights for every forward pass on all ranks at once) and the result needs no
reduction.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerFast

from runtime.contract.config import RuntimeConfig, StageSpec
from runtime.core.checkpoint import rng_restored
from runtime.core.classify import predict_labels
from runtime.core.data import Encoded, read_examples
from runtime.core.distributed import Dist, autocast

HELDOUT_SAMPLE = 256  # held-out rows per evaluation
ACCURACY_SAMPLE = 64  # held-out rows whose label is predicted per evaluation (generation is slower)


@contextmanager
def untouched_rng_and_eval_mode(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Evaluation inside training: no dropout, no gradients, and the random number generators
    restored afterwards, so the next training step draws what it would have drawn."""
    was_training = model.training
    with rng_restored(device), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


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
        """The evaluation with the lowest held-out loss (the earliest of equal ones)."""
        finite = [point for point in self.history if math.isfinite(point[1])]
        return min(finite, key=lambda point: (point[1], point[0])) if finite else None

    def improved(self) -> bool:
        """Whether the latest evaluation is the best so far: lower than every earlier one."""
        return bool(self.history) and self.best() == self.history[-1]

    def patience_spent(self) -> bool:
        """`early_stopping_patience` evaluations in a row since the best one, none of them lower."""
        patience, best = self.stage.early_stopping_patience, self.best()
        if not patience or not self.history:
            return False
        since = len(self.history) - 1 - self.history.index(best) if best else len(self.history)
        return since >= patience

    def measure(self, step: int, forward: Callable, model: torch.nn.Module, run) -> float:
        """The mean held-out loss now (collective: every rank calls it at the same step)."""
        d: Dist = run.d
        sample = list(self.rows[:HELDOUT_SAMPLE])
        size = self.stage.micro_batch_size
        batches = [sample[i : i + size] for i in range(0, len(sample), size)]
        mine = batches[d.rank :: d.world]
        rounds = math.ceil(len(batches) / d.world)  # the same number of forward passes on every rank
        totals = torch.zeros(2, dtype=torch.float64, device=run.device)
        with untouched_rng_and_eval_mode(model, run.device):
            for k in range(rounds):
                real = k < len(mine)
                batch = self.collate(mine[k] if real else batches[0])
                batch = {key: value.to(run.device) for key, value in batch.items()}
                with autocast(run.config, run.device):
                    out = forward(batch)
                if real:
                    totals[0] += out[0].detach().double()
                    totals[1] += float(out[1])
        if d.world > 1:
            dist.all_reduce(totals)
        loss = round(float(totals[0] / totals[1].clamp(min=1)), 5)
        self.history.append((step, loss))
        return loss


@dataclass
class HeldoutAccuracy:
    """The classification eval's accuracy on a fixed sample of held-out rows, during training."""

    config: RuntimeConfig
    examples: Sequence[Encoded]  # the first ACCURACY_SAMPLE held-out rows, in file order
    tokenizer: Any

    def measure(self, model: torch.nn.Module, run) -> float:
        """The share of `examples` whose predicted label is the gold one (every rank, the same)."""
        with untouched_rng_and_eval_mode(model, run.device), autocast(run.config, run.device):
            predicted, _, _ = predict_labels(model, self.tokenizer, self.config, self.examples)
        gold = [e.label.lower() for e in self.examples]
        return round(sum(g == p for g, p in zip(gold, predicted)) / len(gold), 4)


def heldout_accuracy(config: RuntimeConfig, build_dir: Path, stage: StageSpec) -> HeldoutAccuracy | None:
    """The accuracy to measure beside the held-out loss: when the stage evaluates during training
    and the recipe's eval classifies the held-out rows of the data this stage trains on."""
    spec = config.eval
    if not stage.eval_every_steps or spec is None or spec.kind != "classification" or spec.data != stage.data:
        return None
    examples = read_examples(build_dir / config.data[stage.data].heldout)[:ACCURACY_SAMPLE]
    if not examples:
        return None
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(build_dir / config.tokenizer.file))
    return HeldoutAccuracy(config, examples, tokenizer)
