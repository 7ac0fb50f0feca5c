"""The files of a build directory besides runtime.json, as typed, versioned models.

  plan.json                 written by `recipe compile`; `Plan` is the part the runtime reads
  metrics.jsonl             one `MetricsRecord` a line, appended as a run trains (read in
                            runtime.contract.metrics)
  stages/<name>/done.json   a finished stage: `StageDone`, its `StageReport`
  train_report.json         `TrainReport`: every stage's report, written when a run ends
  eval.json                 `EvalReport`, written by `recipe eval`
  run_report.json           `RunReport`: the plan's predictions beside what the run measured

Every reader and writer of these files goes through this module. Each file carries a
`format_version`, checked on read: a file of another version is refused with an error naming the
file, the version this runtime reads and the one it found. Files written before their format had
a version field (train reports, eval reports and metrics records of format 1) read as version 1.
A writer writes exactly the fields it was given, so an optional key that a stage does not report
stays absent from the file rather than appearing as null.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from runtime.contract.config import IncompatibleBuildError

# plan.json's version: the compiler writes it (compiler.emission.plan), the runtime checks it.
PLAN_FORMAT_VERSION = 3
TRAIN_REPORT_FORMAT_VERSION = 1
METRICS_FORMAT_VERSION = 1
EVAL_FORMAT_VERSION = 1
RUN_REPORT_FORMAT_VERSION = 1

Artifact = TypeVar("Artifact", bound=BaseModel)


class IncompatibleArtifactError(IncompatibleBuildError):
    """A build file that is missing, unreadable, or of a format version this runtime does not read."""


class _Written(BaseModel):
    """A file the runtime writes: every key it may hold is a field here."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _Read(BaseModel):
    """The part of a compiler-written file the runtime reads; the compiler writes more besides."""

    model_config = ConfigDict(extra="ignore", frozen=True)


# ---------------------------------------------------------------------------------------------
# plan.json (the runtime's view)


class PlanParams(_Read):
    total: int | None = None
    trainable: int | None = None
    active: int | None = None  # mixture of experts: parameters one token passes through


class PlanMemory(_Read):
    peak_gib: float | None = None  # per device
    breakdown_gib: dict[str, float] = {}  # by category (weights, gradients, optimizer, activations, ...)


class PlanCompute(_Read):
    wall_s: float | None = None
    cost_usd: float | None = None


class PlanStageTokens(_Read):
    train_examples: int | None = None
    eval_examples: int | None = None
    n_positions: int | None = None
    truncated_examples: int | None = None
    label_truncated_examples: int | None = None
    dropped_examples: int | None = None


class Packing(BaseModel):
    """Packed rows (train.packing): the tokens of a row, the rows (packs) and the sequences they
    hold, sequences per pack and the share of the rows' token slots left as padding; in the run's
    report also how the sequences of a pack attended (runtime.stages.language_model.packed_attention)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    budget: int
    packs: int
    sequences: int
    sequences_per_pack: float
    padding_share: float
    attention: str | None = None


class PlanStage(_Read):
    name: str
    steps: int  # optimizer steps (rollouts for ppo), by runtime.contract.steps
    kind: str | None = None
    adapter: str | None = None
    data: str | None = None
    train_tokens: int | None = None
    tokens: PlanStageTokens | None = None
    memory: PlanMemory | None = None
    compute: PlanCompute | None = None
    params: PlanParams | None = None


class PlanDataTokens(_Read):
    tokens_removed: int | None = None


class PlanData(_Read):
    tokens: PlanDataTokens | None = None


class PlanTotals(_Read):
    wall_s: float | None = None
    train_tokens: int | None = None
    peak_gib: float | None = None


class PlanHardware(_Read):
    device: str | None = None
    nodes: int | None = None
    nproc_per_node: int | None = None
    precision: str | None = None


class Plan(_Read):
    format_version: int
    name: str | None = None
    summary: str | None = None
    hardware: PlanHardware | None = None
    data: dict[str, PlanData] = {}
    stages: tuple[PlanStage, ...] = ()
    totals: PlanTotals | None = None

    def stage(self, name: str) -> PlanStage | None:
        return next((s for s in self.stages if s.name == name), None)


# ---------------------------------------------------------------------------------------------
# what training writes: metrics records, stage reports, the train report


class MetricsRecord(_Written):
    """One logged step; the metrics are means over the steps since the previous record."""

    format_version: int = METRICS_FORMAT_VERSION
    stage: str
    step: StrictInt
    # The training loss; may be NaN when training diverged (readers skip such records). None on a
    # row of the held-out evaluation during training, which carries `eval_loss` instead.
    loss: float | None = None
    eval_loss: float | None = None  # held-out loss at this step (`eval_every_steps`)
    eval_accuracy: float | None = None  # and a classification eval's accuracy on a sample of it
    epoch: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None  # non-pad tokens of all processes per second
    peak_memory_gib: float | None = None  # on a GPU: torch's peak allocation
    peak_rss_gib: float | None = None  # on CPU: the process's peak resident set
    rss_gib: float | None = None  # the process's resident set when the step was logged
    # reward and dpo stages
    accuracy: float | None = None
    margin: float | None = None
    abs_error: float | None = None
    # ppo
    reward_mean: float | None = None
    kl: float | None = None
    completion_tokens: float | None = None
    policy_loss: float | None = None
    value_loss: float | None = None
    clipfrac: float | None = None
    ptx_loss: float | None = None
    # grpo (also reward_mean, kl, completion_tokens, policy_loss, clipfrac)
    rewards: dict[str, float] | None = None  # mean of each reward function, unweighted
    zero_std_share: float | None = None  # share of groups whose rewards are all equal (no signal)


class HeldoutMetrics(_Written):
    """Held-out measurements of a reward, dpo or ppo stage (which of them depends on the kind)."""

    pairs: int | None = None
    rows: int | None = None
    prompts: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    mean_margin: float | None = None
    mse: float | None = None
    pearson: float | None = None
    mean_reward: float | None = None
    mean_completion_tokens: float | None = None
    rewards: dict[str, float] | None = None  # grpo: each reward function's mean


class HeldoutBeforeAfter(_Written):
    before: HeldoutMetrics | None = None
    after: HeldoutMetrics | None = None


Heldout = HeldoutBeforeAfter | HeldoutMetrics


class StageReport(_Written):
    """What one stage did. Reports of older runs may lack any field but the stage's name."""

    stage: str
    kind: str | None = None
    adapter: str | None = None
    steps: int | None = None
    start_step: int | None = None  # the step it resumed from (0: from the start)
    wall_s: float | None = None  # over all attempts
    tokens: int | None = None
    tokens_per_s: float | None = None
    # the steps after this attempt's first, whose time includes torch.compile's with train.compile
    steady_tokens_per_s: float | None = None
    compile_s: float | None = None  # train.compile: the first step's time beyond a steady step's
    peak_memory_gib: float | None = None
    peak_rss_gib: float | None = None
    # the longest micro-batch's forward and backward before the first step (runtime.core.probe)
    probe_peak_gib: float | None = None
    first_loss: float | None = None
    final_loss: float | None = None
    examples: int | None = None
    params_total: int | None = None
    params_trainable: int | None = None
    loss_unit: str | None = None  # what the loss is averaged over: tokens, pairs or rows
    heldout: Heldout | None = None
    packing: Packing | None = None  # pretrain and sft with train.packing
    # the evaluations during training (`eval_every_steps`): how many, and the best of them
    evaluations: int | None = None
    best_eval_step: int | None = None
    best_eval_loss: float | None = None
    kept_step: int | None = None  # save_best: the step whose weights are the stage's output
    stopped_at_step: int | None = None  # early_stopping_patience ended the stage here, before its planned steps
    stop_reason: str | None = None
    # ppo
    first_reward: float | None = None
    final_reward: float | None = None
    final_kl: float | None = None
    max_new_tokens: int | None = None
    regex_timeouts: int | None = None  # grpo: regex rewards that ran out of time (scored 0)


class StageDone(_Written):
    """stages/<name>/done.json: the stage finished for the runtime.json with this sha256."""

    config_sha256: str
    report: StageReport


class TrainReport(_Written):
    format_version: int = TRAIN_REPORT_FORMAT_VERSION
    device: str | None = None
    precision: str | None = None
    world_size: int | None = None
    # what the process did with freed host memory (hardware.host_memory); None off glibc
    host_memory: Literal["release", "reuse"] | None = None
    stages: tuple[StageReport, ...] = ()


# ---------------------------------------------------------------------------------------------
# eval.json


class ClassMetrics(_Written):
    support: int
    predicted: int
    correct: int
    precision: float
    recall: float
    f1: float


class EvalSample(_Written):
    line: int
    prompt: str
    generated: str
    label: str | None = None  # classification
    reference: str | None = None  # language model


class EvalReport(_Written):
    format_version: int = EVAL_FORMAT_VERSION
    n: int | None = None
    loss: float | None = None  # mean over the supervised (completion) tokens
    perplexity: float | None = None
    samples: tuple[EvalSample, ...] = ()
    # classification
    accuracy: float | None = None
    majority_class: str | None = None
    majority_baseline: float | None = None
    untrained_accuracy: float | None = None
    macro_f1: float | None = None
    per_class: dict[str, ClassMetrics] = {}
    confusion: dict[str, dict[str, int]] = {}  # gold label -> predicted label (or "(other)") -> count
    invalid_predictions: int | None = None
    extract: str | None = None
    generation_s: float | None = None
    generated_tokens_per_s: float | None = None
    # language model
    supervised_tokens: int | None = None
    # kind = "harness": lm-evaluation-harness's figures (runtime/harness.py: version, settings, per task)
    harness: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# run_report.json


class Comparison(_Written):
    planned: int | float | None
    actual: int | float | None
    ratio: float | None  # actual / planned


class MemoryComparison(Comparison):
    measured: Literal["cuda_allocated", "process_rss"] | None


class LossSummary(_Written):
    first: float | None
    final: float | None
    lowest_logged: float | None
    first_logged_step: int | None
    last_logged_step: int | None
    logged_steps: int


class Truncation(_Written):
    examples: int | None
    n_positions: int | None
    truncated_examples: int | None
    label_truncated_examples: int | None
    dropped_examples: int | None
    tokens_removed: int | None


class RunStage(_Written):
    stage: str
    kind: str | None
    adapter: str | None
    ran: bool
    start_step: int | None
    peak_memory_gib: MemoryComparison
    wall_s: Comparison
    tokens_per_s: Comparison
    steps: Comparison
    probe_peak_gib: Comparison | None = None  # the plan's peak against the longest micro-batch's
    tokens: Comparison
    train_examples: Comparison
    params_total: Comparison
    params_trainable: Comparison
    loss: LossSummary
    truncation: Truncation | None
    heldout: Heldout | None
    packing: Packing | None = None
    steady_tokens_per_s: float | None = None  # the steps after the first (train.compile's is apart)
    compile_s: float | None = None  # train.compile: the first step's time beyond a steady step's
    # the held-out loss during training (`eval_every_steps`): how often, the best step, the last value
    evaluations: int | None = None
    best_eval_step: int | None = None
    best_eval_loss: float | None = None
    last_eval_loss: float | None = None
    kept_step: int | None = None  # save_best
    stopped_at_step: int | None = None  # early_stopping_patience
    stop_reason: str | None = None
    reward_steps: tuple[MetricsRecord, ...] | None = None  # grpo: the logged steps, for the per-step table


class RunTotals(_Written):
    wall_s: Comparison
    tokens: Comparison
    tokens_per_s: Comparison
    peak_memory_gib: Comparison


class RunEval(_Written):
    """The headline numbers of eval.json."""

    n: int | None = None
    accuracy: float | None = None
    majority_baseline: float | None = None
    macro_f1: float | None = None
    loss: float | None = None
    perplexity: float | None = None


class RunReport(_Written):
    format_version: int = RUN_REPORT_FORMAT_VERSION
    name: str
    plan_summary: str | None
    device: str | None
    precision: str | None
    world_size: int | None
    host_memory: Literal["release", "reuse"] | None = None
    stages: tuple[RunStage, ...]
    totals: RunTotals
    eval: RunEval | None


# ---------------------------------------------------------------------------------------------
# reading and writing

_FIX_PLAN = "recompile the recipe with the installed `recipe`"
_FIX_OUTPUT = "it was written by another version of the runtime; delete it, or run the build again"


def to_data(model: BaseModel) -> dict[str, Any]:
    """The model as JSON data, exactly as written: the fields it was given, and its version."""
    data = model.model_dump(exclude_unset=True)
    if "format_version" in type(model).model_fields:
        data["format_version"] = model.format_version
    return data


def dumps(model: BaseModel, *, indent: int | None = 2) -> str:
    """Deterministic JSON of an artifact: sorted keys; one line when `indent` is None (metrics)."""
    return json.dumps(to_data(model), indent=indent, sort_keys=True) + "\n"


def check_version(path: Path | str, data: dict[str, Any], expected: int, *, required: bool = False,
                  fix: str = _FIX_OUTPUT) -> None:
    """Refuse `data` (read from `path`) unless its format_version is `expected`. Without the field
    the file reads as version 1 (files from before the field existed) unless it is `required`."""
    found = data.get("format_version", None if required else 1)
    if found != expected:
        seen = "has no format_version" if found is None else f"has format_version {found!r}"
        raise IncompatibleArtifactError(f"{path} {seen}, this runtime reads {expected}; {fix}")


def _read(path: Path, model: type[Artifact], expected: int | None, *, required: bool = False,
          fix: str = _FIX_OUTPUT) -> Artifact:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IncompatibleArtifactError(f"{path} not found; {fix}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise IncompatibleArtifactError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise IncompatibleArtifactError(f"{path} does not hold a JSON object")
    if expected is not None:
        check_version(path, data, expected, required=required, fix=fix)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise IncompatibleArtifactError(f"{path} does not match its format:\n{exc}") from exc


def read_plan(path: Path) -> Plan:
    """A build's plan.json; refuses a plan of another format version."""
    return _read(Path(path), Plan, PLAN_FORMAT_VERSION, required=True, fix=_FIX_PLAN)


def read_train_report(path: Path) -> TrainReport:
    return _read(Path(path), TrainReport, TRAIN_REPORT_FORMAT_VERSION)


def read_stage_done(path: Path) -> StageDone:
    return _read(Path(path), StageDone, None)


def read_eval_report(path: Path) -> EvalReport:
    return _read(Path(path), EvalReport, EVAL_FORMAT_VERSION)


def read_run_report(path: Path) -> RunReport:
    return _read(Path(path), RunReport, RUN_REPORT_FORMAT_VERSION, required=True)
