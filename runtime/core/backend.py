"""How a loss module is trained: plain PyTorch (one process or DistributedDataParallel), or
DeepSpeed ZeRO when the build plans it (runtime/core/deepspeed_backend.py). Both give the loops
the same small interface: forward, backward, step, lr, save, load, trained_model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from runtime.contract.config import RuntimeConfig, StageSpec, uses_deepspeed
from runtime.contract.layout import OPTIMIZER_FILE, TRAINABLE_FILE
from runtime.core.distributed import Dist
from runtime.core.optim import build_optimizer, build_scheduler
from runtime.core.outputs import load_trainable
from runtime.core.run import Run


class TorchBackend:
    """Plain PyTorch: one process, or DistributedDataParallel across several."""

    def __init__(self, config: RuntimeConfig, stage: StageSpec, model: torch.nn.Module, loss: torch.nn.Module,
                 d: Dist, device: torch.device, total_steps: int):
        self.config, self.stage, self.model, self.d = config, stage, model, d
        self.loss_module = loss.to(device)
        self.wrapped: torch.nn.Module = self.loss_module
        if d.world > 1:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.optimizer = build_optimizer(model, stage)
        self.scheduler = build_scheduler(self.optimizer, stage, total_steps)
        self.scaler = torch.amp.GradScaler(enabled=config.hardware.precision == "fp16")

    def forward(self, batch: dict) -> tuple:
        return self.wrapped(**batch)

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        sync = contextlib.nullcontext() if last_micro or self.d.world == 1 else self.wrapped.no_sync()
        with sync:
            self.scaler.scale(loss).backward()

    def step(self) -> float:
        self.scaler.unscale_(self.optimizer)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.stage.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(grad_norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path) -> None:
        """Every rank calls this; rank 0 writes the shared state (DDP replicas are identical)."""
        if self.d.is_main:
            trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
            torch.save(trainable, folder / TRAINABLE_FILE)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict()}, folder / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        trainable = torch.load(folder / TRAINABLE_FILE, map_location="cpu", weights_only=True)
        load_trainable(self.model, trainable, folder)
        state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def trained_model(self) -> torch.nn.Module:
        return self.model


def make_backend(run: Run, stage: StageSpec, model: torch.nn.Module, loss: torch.nn.Module, total_steps: int):
    """The backend the build plans for training `model` through `loss`."""
    if uses_deepspeed(run.config.hardware):
        from runtime.core.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(run, stage, model, loss, total_steps)
    return TorchBackend(run.config, stage, model, loss, run.d, run.device, total_steps)
