"""The recipe: what a team writes. Pydantic models, strict and frozen.

Sections live in `compiler.loading.spec`; this module assembles them. Validators here only check;
defaults live on the fields, and values the compiler derives (context length, budgets, steps)
are computed later and shown in the plan with their reasons.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from compiler.loading.spec.base import NAME_PATTERN, Section
from compiler.loading.spec.data import (
    CHAT_FORMATS,
    FORMAT_FIELDS,
    Dataset,
    DataSource,
    DeriveBins,
    SplitSection,
    TemplateSection,
    TokensSection,
)
from compiler.loading.spec.infra import BudgetSection, HardwareSection, LaunchSection
from compiler.loading.spec.model import (
    AdapterSection,
    FreezeAdapter,
    FullAdapter,
    LoraAdapter,
    ModelSection,
    PrefixAdapter,
    PretrainedModel,
    ScratchModel,
    TokenizerSection,
)
from compiler.loading.spec.stages import (
    TRAIN_KEYS,
    DpoStage,
    EvalSection,
    GenerationSection,
    GrpoStage,
    PpoStage,
    PretrainStage,
    RewardStage,
    SftStage,
    StageSection,
    TrainSection,
)

Stage = PretrainStage | SftStage | RewardStage | DpoStage | PpoStage | GrpoStage

__all__ = [
    "CHAT_FORMATS", "FORMAT_FIELDS", "AdapterSection", "Dataset", "DataSource", "DeriveBins", "DpoStage",
    "EvalSection", "FreezeAdapter", "FullAdapter", "GenerationSection", "GrpoStage", "LoraAdapter", "ModelSection",
    "PpoStage", "PrefixAdapter", "PretrainStage", "PretrainedModel", "Recipe", "RewardStage", "ScratchModel",
    "SftStage", "SplitSection", "Stage", "StageSection", "TemplateSection", "TokenizerSection", "TokensSection",
    "TrainSection", "dataset_template", "eval_dataset", "eval_stage", "stage_adapter", "stage_dataset", "training",
    "used_datasets",
]


class Recipe(Section):
    """A training recipe: model, data, template, stages, eval and hardware in one file."""

    name: str
    """Names the build directory (build/<name>): lowercase letters, digits, '.', '_' or '-'."""
    description: str = ""
    """One line saying what the recipe trains; shown in the plan."""
    seed: int = 0
    """Seed for weight initialisation, data order and sampling."""
    allow_code: bool = False
    """Allow rewards that run Python code named by the recipe (kind = "python"); the plan and the
    manifest list that code. Off by default: a recipe from an untrusted source must not run code."""
    model: ModelSection
    """The network: from scratch or a pretrained checkpoint."""
    tokenizer: TokenizerSection | None = None
    """The tokenizer; required for a model trained from scratch."""
    adapter: AdapterSection = FullAdapter(kind="full")
    """What trains: full, lora, prefix (P-tuning v2) or freeze. Stages may override it."""
    data: dict[str, Dataset] = Field(min_length=1)
    """Named data sets, e.g. [data.tweets]."""
    template: TemplateSection | None = None
    """How rows become text; a data set may carry its own."""
    tokens: TokensSection = TokensSection()
    """The token budget."""
    train: TrainSection = TrainSection()
    """Hyperparameters shared by every stage."""
    stages: list[StageSection] = Field(min_length=1)
    """Training stages, run in order; each may start from an earlier one's weights."""
    eval: EvalSection | None = None
    """Evaluation after training."""
    hardware: HardwareSection = HardwareSection()
    """Devices, precision and memory features."""
    launch: LaunchSection = LaunchSection()
    """Process launch and Slurm settings."""
    budget: BudgetSection = BudgetSection()
    """Cost, time and memory limits checked by `recipe check`."""

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise ValueError(
                f"name \"{name}\" must be lowercase letters, digits, '.', '_' or '-' (it names the build directory)"
            )
        return name

    @field_validator("data")
    @classmethod
    def _dataset_names(cls, data: dict[str, Dataset]) -> dict[str, Dataset]:
        for name in data:
            if not NAME_PATTERN.match(name):
                raise ValueError(f"data set name \"{name}\" must be lowercase letters, digits, '.', '_' or '-'")
        return data


def training(recipe: Recipe, stage: Stage) -> TrainSection:
    """The stage's hyperparameters: [train] with the stage's own values laid over it."""
    update = {key: getattr(stage, key) for key in TRAIN_KEYS if getattr(stage, key) is not None}
    if "epochs" in update and "max_steps" not in update:
        update["max_steps"] = None  # a stage that counts epochs does not inherit a step limit
    if "warmup_steps" in update and "warmup_ratio" not in update:
        update["warmup_ratio"] = None
    return recipe.train.model_copy(update=update)


def stage_dataset(recipe: Recipe, stage: Stage) -> str:
    """Name of the data set a stage trains on (the only one, when the stage does not say)."""
    if stage.data is not None:
        return stage.data
    return next(iter(recipe.data))


def dataset_template(recipe: Recipe, name: str) -> TemplateSection:
    template = recipe.data[name].template or recipe.template
    assert template is not None  # data_rules reports a data set without a template before anything reads it
    return template


def stage_adapter(recipe: Recipe, stage: Stage):
    return stage.adapter or recipe.adapter


def eval_stage(recipe: Recipe) -> Stage:
    """The stage [eval] evaluates: eval.stage, else the last stage."""
    name = recipe.eval.stage if recipe.eval and recipe.eval.stage else recipe.stages[-1].name
    return next(s for s in recipe.stages if s.name == name)


def eval_dataset(recipe: Recipe) -> str:
    """The data set [eval] reads: eval.data, else the data of the stage it evaluates."""
    if recipe.eval is not None and recipe.eval.data is not None:
        return recipe.eval.data
    return stage_dataset(recipe, eval_stage(recipe))


def used_datasets(recipe: Recipe) -> list[str]:
    """Every data set a stage trains on or the eval reads, in first-use order."""
    names = [stage_dataset(recipe, s) for s in recipe.stages]
    names += [s.ptx_data for s in recipe.stages if isinstance(s, PpoStage) and s.ptx_data]
    if recipe.eval is not None:
        names.append(eval_dataset(recipe))
    return list(dict.fromkeys(names))
