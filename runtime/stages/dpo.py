"""DPO stage: direct preference optimisation against a frozen reference (Rafailov et al. 2023).

For a pair, with log-probabilities summed over the completion tokens,

    delta = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))

  sigmoid  -(1 - e) log sigmoid(beta delta) - e log sigmoid(-beta delta)   (e = label_smoothing, cDPO)
  hinge    max(0, 1 - beta delta)                                          (SLiC)
  ipo      (delta' - 1 / (2 beta))^2, delta' with each log-ratio averaged over its completion tokens
           (Azar et al. 2023, eq. 17; the per-token average is what trl computes, confirmed by the
           paper's authors)

The implicit rewards beta (log pi - log ref) give the held-out accuracy (chosen above rejected)
and margin. The reference is the policy with its adapter switched off when the stage trains a
LoRA or prefix adapter on the weights it starts from (no second copy in memory); otherwise a
separate frozen model (runtime/core/reference.py).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.contract.artifacts import StageReport
from runtime.contract.config import StageSpec
from runtime.core.data import PairRow, collate_pairs, read_pairs
from runtime.core.loop import train_objective
from runtime.core.losses import TokenLoss
from runtime.core.model import apply_adapter
from runtime.core.objective import Objective, disable_dropout
from runtime.core.reference import as_reference, frozen_reference
from runtime.core.run import Run


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float, loss_type: str, label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards of chosen and rejected ([pairs] each)."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the completion token counts")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class DpoLoss(TokenLoss):
    """The training objective: (loss sum, pairs, metric sums) for a batch of [chosen..., rejected...]."""

    def __init__(self, model: nn.Module, params: dict, reference: nn.Module | None, cross_entropy: str = "chunked"):
        super().__init__(model, cross_entropy=cross_entropy)
        self.beta = params["beta"]
        self.loss_type = params["loss_type"]
        self.label_smoothing = params["label_smoothing"]
        # A tuple keeps the frozen reference out of this module's parameters (DDP, DeepSpeed, checkpoints).
        self._reference = (TokenLoss(reference, cross_entropy=cross_entropy),) if reference is not None else ()

    def logps(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probabilities and completion token counts, per row."""
        losses, counts = self.per_row(input_ids, attention_mask, labels)
        return -losses, counts

    @torch.no_grad()
    def reference_logps(self, input_ids, attention_mask, labels) -> torch.Tensor:
        with as_reference(self, self._reference[0] if self._reference else None) as scorer:
            return -scorer.per_row(input_ids, attention_mask, labels)[0]

    def pair_terms(self, input_ids, attention_mask, labels):
        logps, counts = self.logps(input_ids, attention_mask, labels)
        ref = self.reference_logps(input_ids, attention_mask, labels)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        chosen_n, rejected_n = counts.chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing, chosen_tokens=chosen_n, rejected_tokens=rejected_n)

    def forward(self, input_ids, attention_mask, labels):
        losses, chosen_r, rejected_r = self.pair_terms(input_ids, attention_mask, labels)
        stats = {"accuracy": (chosen_r > rejected_r).float().sum(), "margin": (chosen_r - rejected_r).sum()}
        return losses.sum(), torch.tensor(len(losses), device=losses.device), stats


@torch.no_grad()
def heldout_metrics(loss: DpoLoss, rows: Sequence[PairRow], pad_id: int, device: torch.device,
                    batch_size: int = 16) -> dict:
    """Held-out DPO loss, accuracy of the implicit reward (chosen above rejected) and mean margin."""
    was_training = loss.training
    loss.eval()
    total, correct, margin, n = 0.0, 0, 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate_pairs(rows[start : start + batch_size], pad_id).items()}
            losses, chosen_r, rejected_r = loss.pair_terms(**batch)
            total += float(losses.sum())
            correct += int((chosen_r > rejected_r).sum())
            margin += float((chosen_r - rejected_r).sum())
            n += len(losses)
    finally:
        loss.train(was_training)
    if n == 0:
        return {"pairs": 0}
    return {"pairs": n, "loss": round(total / n, 4), "accuracy": round(correct / n, 4),
            "mean_margin": round(margin / n, 4)}


def objective(run: Run, stage: StageSpec, model: nn.Module) -> Objective:
    """The DPO stage's Objective: the policy starts from `model`; the reference as the stage says."""
    data = run.config.data[stage.data]
    rows, heldout_rows = read_pairs(run.build_dir / data.train), read_pairs(run.build_dir / data.heldout)
    disable_dropout(model)
    reference = frozen_reference(run, stage, model)
    policy = apply_adapter(model, stage.adapter)
    loss = DpoLoss(policy, stage.params, reference, stage.cross_entropy)
    pad_id = run.config.model.pad_token_id
    return Objective(rows=rows, loss=loss, model=policy, unit="pairs", collate=partial(collate_pairs, pad_id=pad_id),
                     heldout_rows=heldout_rows,
                     heldout=lambda: heldout_metrics(loss, heldout_rows, pad_id, run.device))


def train(run: Run, index: int, stage: StageSpec, model: nn.Module) -> tuple[nn.Module, StageReport]:
    """One DPO stage through the shared loop: the trained policy and the stage's report."""
    return train_objective(run, index, stage, objective(run, stage, model))
