"""DeepSpeed ZeRO (stages 1-3, optional CPU offload) behind the same interface as the plain backend.

The engine reads the build's own `ds_config.json` (the file `recipe compile` wrote and a reviewer
saw), wraps the stage's loss module, and takes our optimizer and scheduler, so ZeRO changes where
state lives, not what is computed: on the same data the losses equal the plain backend's.
"""

from __future__ import annotations

import gc
import json
import sys
import warnings
from functools import partial
from pathlib import Path

import torch

from runtime.contract.config import StageSpec
from runtime.contract.layout import DEEPSPEED_TAG, ds_config_file
from runtime.core.checkpoint import CheckpointError
from runtime.core.distributed import all_ranks_max
from runtime.core.optim import build_optimizer, build_scheduler
from runtime.core.run import Run

# torch 2.13 deprecates the collectives ZeRO calls on every step; the warning says nothing to a user.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.", category=FutureWarning)


def _import_deepspeed(device_type: str):
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401

    if device_type == "cpu":
        # On CPU, DeepSpeed compiles a shared-memory all-reduce op with g++ at first init (30-90 s,
        # and a crash where no compiler is installed). Only inference's all-reduce uses it;
        # training's collectives go through gloo. (`import a.b as x` would bind torch, hence sys.modules.)
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


class DeepSpeedBackend:
    def __init__(self, run: Run, stage: StageSpec, model: torch.nn.Module, loss_module: torch.nn.Module,
                 total_steps: int):
        self.run, self.stage, self.model = run, stage, model
        deepspeed = _import_deepspeed(run.device.type)
        deepspeed.init_distributed(dist_backend="nccl" if run.device.type == "cuda" else "gloo")
        config = json.loads((run.build_dir / ds_config_file(stage.name, len(run.config.stages))).read_text())
        # Our own optimizer (AdamW, SGD or Adafactor from torch/transformers) runs where ZeRO puts
        # the state; DeepSpeed's fused CPU Adam would need a compiled op.
        config["zero_force_ds_cpu_optimizer"] = False
        config["steps_per_print"] = 10**9  # progress is ours
        optimizer = build_optimizer(model, stage)
        scheduler = build_scheduler(optimizer, stage, total_steps)
        if run.config.hardware.zero_stage >= 3 and hasattr(loss_module, "agree_chunks"):
            # every head call gathers the sharded head: every rank must score as many chunks
            loss_module.agree_chunks = partial(all_ranks_max, d=run.d, device=run.device)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=loss_module, optimizer=optimizer, lr_scheduler=scheduler, config=config,
        )
        self.gas = self.engine.gradient_accumulation_steps()

    def forward(self, batch: dict) -> tuple:
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        # The loop already divides by the micro-batches in this step (fewer than
        # gradient_accumulation_steps at the end of an epoch); DeepSpeed divides by the configured
        # count again, so undo that, and mark the boundary ourselves.
        self.engine.set_gradient_accumulation_boundary(last_micro)
        self.engine.backward(loss * self.gas)

    def step(self) -> float:
        self.engine.step()  # the boundary was set on the last micro-batch: optimizer, scheduler, zero_grad
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path) -> None:
        """Collective: every rank writes its shard of parameters and optimizer state."""
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"{folder} holds no DeepSpeed checkpoint for this run")

    def trained_model(self) -> torch.nn.Module:
        """The trained model with whole (unpartitioned) weights on rank 0. Collective.

        Under ZeRO-3 each rank holds a shard; the consolidated state dict is gathered to rank 0 and
        written back into the parameters, and the engine is released (its hooks would re-partition
        them)."""
        if self.engine.zero_optimization_stage() == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
            self.engine.destroy()
            if state is not None:
                params = dict(self.model.named_parameters())
                with torch.no_grad():
                    for name, value in state.items():
                        key = name.removeprefix("model.")
                        if key in params:
                            params[key].data = value.to(params[key].dtype)
        else:
            self.engine.destroy()
        self.engine = None
        gc.collect()
        return self.model
