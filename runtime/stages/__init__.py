"""The stage kinds, each in one file, and the one registry the run dispatches on.

Every kind is run by a `train(run, index, stage, model) -> (trained model, StageReport)`. The
kinds that learn from a fixed data set (pretrain, sft, reward, dpo) build an Objective and hand
it to the shared loop (runtime/core/loop.py); ppo and grpo sample their own data and run
their own loops from the same pieces. Stages import only runtime.core and runtime.contract.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from runtime.contract.artifacts import StageReport
from runtime.contract.config import StageSpec
from runtime.core.run import Run
from runtime.stages import dpo, grpo, language_model, ppo, reward


class StageRunner(Protocol):
    def __call__(self, run: Run, index: int, stage: StageSpec, model: nn.Module) -> tuple[nn.Module, StageReport]:
        ...


STAGES: dict[str, StageRunner] = {
    "pretrain": language_model.train,
    "sft": language_model.train,
    "reward": reward.train,
    "dpo": dpo.train,
    "ppo": ppo.train,
    "grpo": grpo.train,
}
