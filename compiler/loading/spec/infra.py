"""Where a recipe runs, how it is launched, and the limits a plan must respect."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from compiler.loading.spec.base import Auto, PositiveFloat, PositiveInt, Section


class HardwareSection(Section):
    """The machines: device type, how many, numeric precision and memory-saving features."""

    device: Literal["cpu", "cuda"] = "cpu"
    """cpu or cuda."""
    gpu: str | None = None
    """GPU model from specs/hardware (e.g. "h100-sxm-80gb"), used for memory, time and cost estimates."""
    nproc_per_node: PositiveInt = 1
    """Processes per node (one per GPU)."""
    nodes: PositiveInt = 1
    """Number of nodes."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; bf16 and fp16 keep fp32 master weights."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO stage 1 or higher)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO stage 3)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel."""
    host_memory: Literal["release", "reuse"] = "release"
    """What the training process does with freed host memory (CPU tensors): "release" gives every
    freed block of 1 MiB or more back to the system at once, so the resident set follows the tensors
    alive, as the plan counts them; "reuse" keeps freed blocks in the C library's heap for the next
    allocation: faster on CPU (about 1.3x on length-grouped rows, 1.4x on packed rows), with a
    resident set 30% or more above the plan's figure. glibc only."""
    memory_gib: PositiveFloat | None = None
    """Memory per device in GiB; overrides the catalog's figure for `gpu`."""
    peak_tflops: PositiveFloat | None = None
    """Dense peak TFLOP/s per device at the training precision; overrides the catalog."""
    mfu: Annotated[float, Field(gt=0, le=1.0)] | None = None
    """Model FLOPs utilisation assumed for time estimates (share of the peak actually achieved)."""
    usd_per_hour: Annotated[float, Field(ge=0)] | None = None
    """Price per device-hour in US dollars; overrides the catalog."""

    @model_validator(mode="after")
    def _consistent(self) -> HardwareSection:
        if self.device == "cpu" and self.precision == "fp16":
            raise ValueError('fp16 training needs a GPU; use precision = "fp32" or "bf16" on cpu')
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage = 3 (found {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage = 1, 2 or 3")
        if self.attention == "flash_attention_2" and self.device == "cpu":
            raise ValueError('attention = "flash_attention_2" needs device = "cuda"; use "sdpa" on cpu')
        return self


_TIME = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SlurmSection(Section):
    """Resources for the emitted job.slurm."""

    partition: str | None = None
    """Slurm partition (#SBATCH --partition)."""
    account: str | None = None
    """Account to charge (#SBATCH --account)."""
    qos: str | None = None
    """Quality of service (#SBATCH --qos)."""
    time: str = "24:00:00"
    """Wall-time limit, [days-]hours:minutes:seconds."""
    cpus_per_task: PositiveInt = 8
    """CPU cores per node for data loading."""
    mem_gib: PositiveInt | None = None
    """Host memory per node in GiB; default: the partition's."""
    extra: list[str] = Field(default_factory=list)
    """Further #SBATCH lines, e.g. ["--constraint=h100"]."""

    @field_validator("time")
    @classmethod
    def _time(cls, value: str) -> str:
        if not _TIME.match(value):
            raise ValueError(f'time "{value}" must look like "24:00:00" or "2-00:00:00"')
        return value


class LaunchSection(Section):
    """How processes are started. Secrets are passed by naming environment variables, never by value."""

    rdzv_port: Annotated[int, Field(ge=1024, le=65535)] | Auto = "auto"
    """torchrun rendezvous port. "auto" derives one from the job identity so two jobs on a node do not collide."""
    env: list[str] = Field(default_factory=list)
    """Names of environment variables the job needs (e.g. HF_TOKEN); their values are never copied into the build."""
    slurm: SlurmSection = SlurmSection()
    """Slurm job settings."""

    @field_validator("env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _ENV_NAME.match(name):
                raise ValueError(f'"{name}" is not an environment variable name (letters, digits, _)')
        return names


class BudgetSection(Section):
    """Limits `recipe check` enforces on the plan; it fails with the reason when one is exceeded."""

    max_usd: PositiveFloat | None = None
    """Most the run may cost, in US dollars."""
    max_gpu_hours: PositiveFloat | None = None
    """Most GPU-hours the run may take."""
    min_memory_headroom_gib: Annotated[float, Field(ge=0)] | None = None
    """Least free memory per device at the estimated peak, in GiB."""
