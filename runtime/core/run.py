"""What every stage needs to know about the run it is part of."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.contract.config import RuntimeConfig
from runtime.contract.layout import CHECKPOINT_DIR
from runtime.core.checkpoint import TrainState
from runtime.core.distributed import Dist


@dataclass
class Run:
    config: RuntimeConfig
    build_dir: Path
    d: Dist
    device: torch.device
    config_sha256: str  # of runtime.json: checkpoints and finished stages belong to this compile
    resume: tuple[Path, TrainState] | None  # the newest usable checkpoint, if any

    @property
    def checkpoints(self) -> Path:
        return self.build_dir / CHECKPOINT_DIR

    def log(self, message: str) -> None:
        """A line on rank 0's stderr."""
        if self.d.is_main:
            print(message, file=sys.stderr, flush=True)
