"""The contract between compiler and runtime.

The compiler writes `runtime.json` into a build directory; the runtime reads only the build
directory, never the recipe. This module is the one both sides import, so it must stay light:
pydantic only, no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Bump on any change a runtime of the previous version would misread.
SCHEMA_VERSION = 1
RUNTIME_CONFIG_FILE = "runtime.json"


class IncompatibleBuildError(Exception):
    """A build directory this runtime cannot execute (missing, corrupt, or another schema version)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Frozen):
    architecture: Literal["gpt2"]
    init: Literal["scratch"]
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    dropout: float
    eos_token_id: int
    pad_token_id: int


class TokenizerSpec(_Frozen):
    file: str  # relative to the build directory
    eos_token: str


class TemplateSpec(_Frozen):
    """The exact jinja2 sources used to render training examples; saved with the model."""

    prompt: str
    completion: str
    add_eos: bool


class DataSpec(_Frozen):
    # Pre-tokenized JSONL files relative to the build directory. Each line:
    # {"row": int, "prompt": [ids], "completion": [ids], "fields": {...}}.
    train: str
    heldout: str
    n_train: int
    n_heldout: int


class StageSpec(_Frozen):
    name: str
    kind: Literal["sft"]
    epochs: int
    micro_batch_size: int
    grad_accum: int
    learning_rate: float
    lr_schedule: Literal["cosine", "linear", "constant"]
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    adam_betas: tuple[float, float]
    log_every_steps: int
    length_grouping: bool


class EvalSpec(_Frozen):
    kind: Literal["classification"]
    label_field: str
    labels: tuple[str, ...]
    extract: Literal["first_word"]
    max_new_tokens: int
    batch_size: int


class HardwareSpec(_Frozen):
    device: Literal["cpu", "cuda"]
    nproc_per_node: int
    nodes: int
    precision: Literal["fp32", "bf16", "fp16"]


class RuntimeConfig(_Frozen):
    schema_version: int
    name: str
    seed: int
    model: ModelSpec
    tokenizer: TokenizerSpec
    template: TemplateSpec
    data: DataSpec
    stages: tuple[StageSpec, ...] = Field(min_length=1)
    eval: EvalSpec
    hardware: HardwareSpec

    def to_json(self) -> str:
        """Deterministic serialisation: sorted keys, fixed indentation, trailing newline."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def load_runtime_config(build_dir: Path) -> RuntimeConfig:
    """Read and check `runtime.json`; refuse builds written for another schema version."""
    path = Path(build_dir) / RUNTIME_CONFIG_FILE
    if not path.is_file():
        raise IncompatibleBuildError(
            f"{path} not found: {build_dir} is not a build directory (run `recipe compile RECIPE` first)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IncompatibleBuildError(f"{path} is not valid JSON ({exc}); recompile the recipe") from exc
    found = raw.get("schema_version") if isinstance(raw, dict) else None
    if found != SCHEMA_VERSION:
        raise IncompatibleBuildError(
            f"{path} has schema_version {found!r}, this runtime reads {SCHEMA_VERSION}; "
            "recompile the recipe with the installed `recipe`"
        )
    try:
        return RuntimeConfig.model_validate(raw)
    except ValidationError as exc:
        raise IncompatibleBuildError(f"{path} does not match schema_version {SCHEMA_VERSION}:\n{exc}") from exc
