"""What a training stage optimises, in the shape the shared training loop runs.

The loop in runtime/core/loop.py (batching, accumulation, DDP or DeepSpeed, checkpoints,
metrics) is the same for every stage that learns from a fixed data set; only the rows, their
batching and the loss differ. Each such stage kind builds an `Objective`; PPO, which makes its own
data by sampling, has its own loop in runtime/stages/ppo.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from runtime.core.evaluation import HeldoutAccuracy


@dataclass
class Objective:
    rows: Sequence[Any]  # training items; len(item) is its length in tokens (for length grouping)
    # forward(**batch) -> (loss sum, items counted, {metric: sum over items}); the loop divides by the count
    loss: nn.Module
    model: nn.Module  # the model being trained: checkpointed and saved as the stage's output
    collate: Callable[[Sequence[Any]], dict[str, torch.Tensor]]
    heldout: Callable[[], dict] | None = None  # held-out metrics once trained (rank 0 only)
    heldout_rows: Sequence[Any] = ()  # held-out items, collated like `rows`: the loss during training
    accuracy: HeldoutAccuracy | None = None  # a classification eval's accuracy beside the held-out loss
    unit: str = "tokens"  # what the loss is averaged over: supervised tokens, pairs or rows
    # with train.packing: rows are packs; runtime.core.packing.packing_report of the sequences
    packing: dict | None = None


def disable_dropout(model: nn.Module) -> None:
    """Preference stages compare log-probabilities or rewards of the same text under two models or
    two passes; dropout noise would bias those differences (trl disables it too, by default)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style functional dropout
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
