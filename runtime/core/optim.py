"""The planned optimizer and learning-rate schedule, shared by every backend and stage."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from runtime.contract.config import StageSpec


def build_optimizer(model: torch.nn.Module, stage: StageSpec) -> torch.optim.Optimizer:
    """The planned optimizer; weight decay on matrices only (biases and layer norms are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    # An empty group is left out (a LoRA trains matrices only): DeepSpeed's ZeRO optimizer drops
    # it, and the scheduler would then step more groups than the optimizer has.
    groups = [g for g in ({"params": decay, "weight_decay": stage.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if stage.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=stage.learning_rate, momentum=stage.momentum)
    if stage.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=stage.learning_rate, scale_parameter=False, relative_step=False)
    if stage.optimizer == "adamw_8bit":
        # bitsandbytes' blockwise 8-bit AdamW (CPU and CUDA kernels); tensors under 4,096 elements
        # keep 32-bit state, as the library does by default
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=stage.learning_rate, betas=stage.adam_betas, eps=stage.adam_eps)
    return torch.optim.AdamW(groups, lr=stage.learning_rate, betas=stage.adam_betas, eps=stage.adam_eps)


def build_scheduler(optimizer: torch.optim.Optimizer, stage: StageSpec, total_steps: int):
    """Warmup, then the planned decay over `total_steps` optimizer steps."""
    return get_scheduler(
        stage.lr_schedule if stage.lr_schedule != "constant" else "constant_with_warmup",
        optimizer, num_warmup_steps=stage.warmup_steps, num_training_steps=total_steps,
    )
