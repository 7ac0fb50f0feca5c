"""The recipe: what a team writes. Pydantic models, strict and frozen.

Every model forbids unknown keys. Validators here only check; defaults live on the fields and
derived values (n_positions, budgets) are computed by the compiler and shown in the plan.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Auto = Literal["auto"]
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """A GPT-2-class decoder trained from scratch."""

    architecture: Literal["gpt2"] = "gpt2"
    init: Literal["scratch"] = "scratch"
    n_embd: PositiveInt
    n_layer: PositiveInt
    n_head: PositiveInt
    n_positions: PositiveInt | Auto = "auto"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSection:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"e.g. n_head = {_nearest_divisor(self.n_embd, self.n_head)}"
            )
        return self


def _nearest_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d))


class DataSource(_Section):
    """Exactly one of: a pinned registry asset, or a local file."""

    asset: str | None = Field(default=None, description="name of a pinned asset in specs/assets.toml")
    path: str | None = Field(default=None, description="file path, relative to the recipe file")

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSource:
        if (self.asset is None) == (self.path is None):
            raise ValueError('give exactly one of asset = "NAME" or path = "FILE" in data.source')
        return self


class TokenizerSection(_Section):
    asset: str = Field(description="name of a pinned tiktoken ranks asset in specs/assets.toml")
    format: Literal["tiktoken"] = "tiktoken"
    special_tokens: dict[str, int] = Field(default_factory=dict)
    eos_token: str


class DeriveBins(_Section):
    """A categorical column cut from a numeric one: value < edges[0] -> labels[0], and so on.

    A value equal to an edge falls into the middle class (the lower/upper bins are strict).
    """

    name: str
    source: str = Field(alias="from")
    edges: list[float] = Field(min_length=1)
    labels: list[str] = Field(min_length=2)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _shape(self) -> DeriveBins:
        if len(self.labels) != len(self.edges) + 1:
            raise ValueError(
                f"{len(self.edges)} edges cut {len(self.edges) + 1} bins but {len(self.labels)} labels "
                "are given; give one label per bin"
            )
        if list(self.edges) != sorted(self.edges) or len(set(self.edges)) != len(self.edges):
            raise ValueError(f"edges must be strictly increasing, got {self.edges}")
        return self


class SplitSection(_Section):
    heldout_fraction: Fraction = 0.2
    seed: int = 0


class DataSection(_Section):
    source: DataSource
    format: Literal["tsv", "csv", "jsonl"]
    columns: list[str] | None = Field(
        default=None, description="column names for header-less TSV/CSV; omit when the file has a header"
    )
    html_unescape: list[str] = Field(default_factory=list)
    derive: list[DeriveBins] = Field(default_factory=list)
    split: SplitSection = SplitSection()


class TemplateSection(_Section):
    prompt: str = Field(description="jinja2 source rendered per row; ends where generation starts")
    completion: str = Field(description="jinja2 source of the supervised target; never truncated")
    add_eos: bool = False


class BudgetSection(_Section):
    max_total_tokens: PositiveInt | Auto = "auto"
    coverage: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    round_to: PositiveInt = 8
    truncatable: list[str] = Field(default_factory=list)


class StageSection(_Section):
    name: str
    kind: Literal["sft"]
    epochs: PositiveInt = 3
    micro_batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    learning_rate: Annotated[float, Field(gt=0.0)] = 5e-4
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0.0)] = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    log_every_steps: PositiveInt = 10
    length_grouping: bool = True


class EvalSection(_Section):
    kind: Literal["classification"] = "classification"
    label_field: str
    extract: Literal["first_word"] = "first_word"
    max_new_tokens: PositiveInt | Auto = "auto"
    batch_size: PositiveInt = 64


class HardwareSection(_Section):
    device: Literal["cpu", "cuda"] = "cpu"
    gpu: str | None = Field(default=None, description="GPU model from specs/hardware (for estimates)")
    nproc_per_node: PositiveInt = 1
    nodes: PositiveInt = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    @model_validator(mode="after")
    def _cpu_precision(self) -> HardwareSection:
        if self.device == "cpu" and self.precision == "fp16":
            raise ValueError('fp16 training needs a GPU; use precision = "fp32" or "bf16" on cpu')
        return self


_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class Recipe(_Section):
    name: str = Field(description="build directory name: lowercase letters, digits, '.', '_', '-'")
    description: str = ""
    seed: int = 0
    model: ModelSection
    tokenizer: TokenizerSection
    data: DataSection
    template: TemplateSection
    budget: BudgetSection = BudgetSection()
    stages: list[StageSection] = Field(min_length=1)
    eval: EvalSection
    hardware: HardwareSection = HardwareSection()

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(
                f"name {name!r} must be lowercase letters, digits, '.', '_' or '-' "
                "(it names the build directory)"
            )
        return name

    @field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, stages: list[StageSection]) -> list[StageSection]:
        seen: set[str] = set()
        for stage in stages:
            if stage.name in seen:
                raise ValueError(f"two stages are named {stage.name!r}; stage names must be unique")
            seen.add(stage.name)
        return stages
