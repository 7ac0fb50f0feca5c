"""Reward stage: the language model with a scalar head, trained on preference pairs or on scores.

The reward model is transformers' `AutoModelForSequenceClassification` with one output, built on
the decoder of the stage it starts from (usually the SFT model), so a user can load it anywhere.
Its reward for a sequence is the head applied to the hidden state of the sequence's last real
token (found from the attention mask, so a padding token that equals EOS is never confused with
the end of the text). The scalar model and its head (`scalar_model`, `ScalarHead`) are in
runtime/core, shared with PPO, whose reward model and critic are such models too.

  pairwise    loss = -log sigmoid(r_chosen - r_rejected)          (Ouyang et al. 2022, eq. 1)
  regression  loss = (r - score)^2                                 (scored completions)

Held-out metrics, before and after training: accuracy = share of pairs whose preferred sequence
gets the higher reward, and the mean margin; for scored data every held-out pair with different
scores counts as a pair, the higher score preferred.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.contract.artifacts import StageReport
from runtime.contract.config import StageSpec
from runtime.core.data import PairRow, ScoredRow, collate_pairs, collate_scored, read_pairs, read_scored
from runtime.core.loop import train_objective
from runtime.core.losses import ScalarHead
from runtime.core.model import apply_adapter, is_scalar, scalar_model
from runtime.core.objective import Objective, disable_dropout
from runtime.core.run import Run


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected) per pair (logsigmoid is the overflow-safe form)."""
    return -F.logsigmoid(chosen - rejected)


class RewardLoss(ScalarHead):
    """The training objective: (loss sum, pairs or rows, metric sums) for one micro-batch."""

    def __init__(self, model: nn.Module, objective: str):
        super().__init__(model)
        self.objective = objective

    def forward(self, input_ids, attention_mask, labels, scores=None):
        r = self.rewards(input_ids, attention_mask)
        if self.objective == "pairwise":
            chosen, rejected = r.chunk(2)  # the batch is [chosen..., rejected...]
            stats = {"accuracy": (chosen > rejected).float().sum().detach(),
                     "margin": (chosen - rejected).sum().detach()}
            return pairwise_loss(chosen, rejected).sum(), torch.tensor(len(chosen), device=r.device), stats
        error = r - scores
        stats = {"abs_error": error.abs().sum().detach()}
        return error.pow(2).sum(), torch.tensor(len(r), device=r.device), stats


@torch.no_grad()
def heldout_metrics(head: ScalarHead, rows: Sequence[PairRow] | Sequence[ScoredRow], pad_id: int,
                    device: torch.device, batch_size: int = 16) -> dict:
    """Accuracy (preferred sequence rewarded higher) and mean margin on held-out data."""
    was_training = head.training
    head.eval()
    try:
        if rows and isinstance(rows[0], PairRow):
            chosen, rejected = [], []
            for start in range(0, len(rows), batch_size):
                batch = collate_pairs(rows[start : start + batch_size], pad_id)
                r = head.rewards(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu()
                c, j = r.chunk(2)
                chosen.append(c)
                rejected.append(j)
            c, j = torch.cat(chosen), torch.cat(rejected)
            return {"pairs": len(c), "accuracy": round(float((c > j).float().mean()), 4),
                    "mean_margin": round(float((c - j).mean()), 4),
                    "loss": round(float(pairwise_loss(c, j).mean()), 4)}
        predicted = []
        for start in range(0, len(rows), batch_size):
            batch = collate_scored(rows[start : start + batch_size], pad_id)
            predicted.append(head.rewards(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu())
        r = torch.cat(predicted).double()
        s = torch.tensor([row.score for row in rows], dtype=torch.float64)
        return {"rows": len(r), **ordering_metrics(r, s), "mse": round(float((r - s).pow(2).mean()), 4),
                "pearson": round(float(torch.corrcoef(torch.stack([r, s]))[0, 1]), 4) if len(r) > 1 else None}
    finally:
        head.train(was_training)


def ordering_metrics(rewards: torch.Tensor, scores: torch.Tensor) -> dict:
    """Every pair (i, j) with scores[i] > scores[j] is a preference pair: the share whose rewards
    are ordered the same way, and the mean reward margin in the preferred direction."""
    dr = rewards[:, None] - rewards[None, :]  # [n, n]: r_i - r_j
    ds = scores[:, None] - scores[None, :]
    preferred = ds > 0  # each unordered pair with different scores appears once
    n = int(preferred.sum())
    if n == 0:
        return {"pairs": 0, "accuracy": None, "mean_margin": None}
    return {"pairs": n, "accuracy": round(float((dr[preferred] > 0).double().mean()), 4),
            "mean_margin": round(float(dr[preferred].mean()), 4)}


def objective(run: Run, stage: StageSpec, model: nn.Module) -> Objective:
    """The reward stage's Objective, starting from `model` (a causal LM gets a fresh scalar head)."""
    data = run.config.data[stage.data]
    pairwise = stage.params["objective"] == "pairwise"
    read = read_pairs if pairwise else read_scored
    rows, heldout_rows = read(run.build_dir / data.train), read(run.build_dir / data.heldout)
    scalar = (model if is_scalar(model) else scalar_model(model, run.config.seed)).to(run.device)
    disable_dropout(scalar)
    pad_id = run.config.model.pad_token_id
    scalar.config.pad_token_id = pad_id
    before = heldout_metrics(ScalarHead(scalar), heldout_rows, pad_id, run.device) if run.d.is_main else None
    trained = apply_adapter(scalar, stage.adapter, scalar=True)
    loss = RewardLoss(trained, stage.params["objective"])
    return Objective(
        rows=rows, loss=loss, model=trained, unit="pairs" if pairwise else "rows", heldout_rows=heldout_rows,
        collate=partial(collate_pairs if pairwise else collate_scored, pad_id=pad_id),
        heldout=lambda: {"before": before, "after": heldout_metrics(loss, heldout_rows, pad_id, run.device)},
    )


def train(run: Run, index: int, stage: StageSpec, model: nn.Module) -> tuple[nn.Module, StageReport]:
    """One reward stage through the shared loop: the trained reward model and the stage's report."""
    return train_objective(run, index, stage, objective(run, stage, model))
