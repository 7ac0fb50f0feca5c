"""Frozen models a stage compares with or scores by: the reference of DPO and PPO, PPO's reward
model and the critic's starting weights.

The reference is named by the stage's `reference` (default: the weights the stage starts from).
When the stage trains a LoRA or prefix adapter on exactly those weights, the reference is the
policy itself with its adapter switched off: no second copy in memory. Otherwise it is a frozen
copy. DPO and PPO both build theirs here, by the same rule.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from runtime.contract.config import StageSpec
from runtime.core.losses import TokenLoss
from runtime.core.model import hold_in_precision, load_model
from runtime.core.outputs import load_stage_output
from runtime.core.run import Run

SHARES_WEIGHTS = ("lora", "prefix")  # adapters the policy can switch off to become the reference


def frozen_model(run: Run, name: str) -> nn.Module:
    """A frozen copy of "base" or of an earlier stage's output, on this run's device."""
    stage = next((s for s in run.config.stages if s.name == name), None)
    if name == "base" or stage is None:
        torch.manual_seed(run.config.seed)
        model = load_model(run.config.model, run.config.hardware, frozen=True)
    else:
        model = hold_in_precision(load_stage_output(run.config, run.build_dir, name), run.config.hardware,
                                  trains_whole=False)
    model.requires_grad_(False)
    return model.eval().to(run.device)


def frozen_reference(run: Run, stage: StageSpec, start: nn.Module) -> nn.Module | None:
    """The stage's reference as a separate frozen model, or None when it is the policy with its
    adapter switched off. `start` is the model the stage starts from, before its adapter."""
    name = stage.params.get("reference") or stage.start
    if name == stage.start and stage.adapter.kind in SHARES_WEIGHTS:
        return None
    if name != stage.start:
        return frozen_model(run, name)
    reference = hold_in_precision(copy.deepcopy(start), run.config.hardware, trains_whole=False)
    reference.requires_grad_(False)
    return reference.eval()


@contextlib.contextmanager
def as_reference(policy: TokenLoss, reference: TokenLoss | None) -> Iterator[TokenLoss]:
    """The loss module that scores under the reference: the separate one, or the policy with its
    adapter off for the duration of the block."""
    if reference is not None:
        yield reference
        return
    with policy.adapter_off() as off:
        yield off
