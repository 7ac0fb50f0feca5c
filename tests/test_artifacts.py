"""The typed, versioned build files (runtime.contract.artifacts): what is written is what was
given, every file's version is checked on read, and the plan's version is the compiler's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.contract.artifacts import (
    EvalReport, HeldoutBeforeAfter, HeldoutMetrics, IncompatibleArtifactError, MetricsRecord,
    StageReport, TrainReport, dumps, read_eval_report, read_plan, read_run_report, read_stage_done, read_train_report,
)
from runtime.contract.config import IncompatibleBuildError
from runtime.contract.metrics import read_metrics

GOLDEN = Path(__file__).resolve().parent / "golden"
RUN_REPORT_PLAN = Path(__file__).resolve().parent / "data" / "run_report" / "plan.json"

PPO_STAGE = {
    "stage": "ppo", "kind": "ppo", "adapter": "lora", "steps": 16, "start_step": 8, "wall_s": 12.5, "tokens": 4096,
    "tokens_per_s": 327.7, "peak_memory_gib": None, "peak_rss_gib": 1.25, "first_loss": -0.01, "final_loss": 0.02,
    "first_reward": -0.3, "final_reward": 0.4, "final_kl": 0.05, "examples": 64, "params_total": 100,
    "params_trainable": 10, "loss_unit": "tokens", "max_new_tokens": 4,
    "heldout": {"before": {"prompts": 16, "mean_reward": -0.2, "mean_completion_tokens": 3.5},
                "after": {"prompts": 16, "mean_reward": 0.3, "mean_completion_tokens": 3.25}},
}
DPO_STAGE = {"stage": "dpo", "kind": "dpo", "heldout": {"pairs": 32, "loss": 0.61, "accuracy": 0.75,
                                                          "mean_margin": 0.2}}
SFT_STAGE = {"stage": "sft", "kind": "sft", "adapter": "full", "steps": 8, "first_loss": 10.5, "final_loss": 9.75}


@pytest.mark.parametrize("case", sorted(p.name for p in GOLDEN.iterdir() if (p / "plan.json").is_file()))
def test_compiled_plans_read_with_their_steps(case: str) -> None:
    raw = json.loads((GOLDEN / case / "plan.json").read_text())
    plan = read_plan(GOLDEN / case / "plan.json")
    assert [s.name for s in plan.stages] == [s["name"] for s in raw["stages"]]
    assert [s.steps for s in plan.stages] == [s["steps"] for s in raw["stages"]]
    assert plan.totals.wall_s == raw["totals"]["wall_s"]


def test_a_written_report_holds_exactly_the_fields_it_was_given(tmp_path: Path) -> None:
    report = {"format_version": 1, "device": "cpu", "precision": "fp32", "world_size": 2,
              "stages": [SFT_STAGE, DPO_STAGE, PPO_STAGE]}
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    path = tmp_path / "train_report.json"
    path.write_text(text)
    read = read_train_report(path)
    assert dumps(read) == text  # no field added (an sft stage has no first_reward), none lost
    assert isinstance(read.stages[2].heldout, HeldoutBeforeAfter) and read.stages[2].heldout.after.mean_reward == 0.3
    assert isinstance(read.stages[1].heldout, HeldoutMetrics) and read.stages[1].heldout.accuracy == 0.75
    # Built in code, the version is written although it was not passed.
    assert json.loads(dumps(TrainReport(stages=[StageReport(stage="sft")]))) == {
        "format_version": 1, "stages": [{"stage": "sft"}]}


def test_a_metrics_line_is_what_the_loop_wrote() -> None:
    record = MetricsRecord(stage="sft", step=3, loss=float("nan"), lr=1e-3, peak_rss_gib=0.5)
    assert dumps(record, indent=None) == (
        '{"format_version": 1, "loss": NaN, "lr": 0.001, "peak_rss_gib": 0.5, "stage": "sft", "step": 3}\n')


@pytest.mark.parametrize(("name", "read", "data"), [
    ("train_report.json", read_train_report, {"stages": []}),
    ("eval.json", read_eval_report, {"n": 3}),
    ("run_report.json", read_run_report, None),
    ("plan.json", read_plan, {"stages": []}),
])
def test_a_file_of_another_version_is_refused_naming_both_versions(tmp_path: Path, name, read, data) -> None:
    path = tmp_path / name
    path.write_text(json.dumps({**(data or {}), "format_version": 99}))
    with pytest.raises(IncompatibleArtifactError, match=rf"{name} has format_version 99, this runtime reads \d"):
        read(path)
    assert issubclass(IncompatibleArtifactError, IncompatibleBuildError)  # the runtime's errors exit 1


def test_files_from_before_their_version_field_read_as_version_1_but_a_plan_needs_one(tmp_path: Path) -> None:
    (tmp_path / "train_report.json").write_text(json.dumps({"stages": [SFT_STAGE]}))
    assert read_train_report(tmp_path / "train_report.json").stages[0].final_loss == 9.75
    (tmp_path / "eval.json").write_text(json.dumps({"accuracy": 0.5, "n": 4, "per_class": {}}))
    assert read_eval_report(tmp_path / "eval.json").accuracy == 0.5
    plan = json.loads(RUN_REPORT_PLAN.read_text())
    del plan["format_version"]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(IncompatibleArtifactError, match="plan.json has no format_version, this runtime reads 3"):
        read_plan(tmp_path / "plan.json")


def test_unknown_fields_and_missing_files_are_errors(tmp_path: Path) -> None:
    (tmp_path / "eval.json").write_text(json.dumps({"n": 3, "acuracy": 0.5}))
    with pytest.raises(IncompatibleArtifactError, match="acuracy"):
        read_eval_report(tmp_path / "eval.json")
    with pytest.raises(IncompatibleArtifactError, match="not found"):
        read_stage_done(tmp_path / "done.json")
    assert EvalReport.model_validate({"n": 3}).samples == ()


def test_metrics_skip_partial_lines_and_refuse_another_version(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = ['{"stage": "sft", "step": 1, "loss": 2.0}', '{"stage": "sft", "step": 2, "loss": NaN}',
             '{"stage": "sft", "step": true, "loss": 1.0}', '[1]', '{"stage": "sft", "st']
    path.write_text("\n".join(lines) + "\n")
    assert [(r.step, r.loss) for r in read_metrics(path)["sft"]] == [(1, 2.0)]
    path.write_text('{"stage": "sft", "step": 1, "loss": 2.0, "format_version": 2}\n')
    with pytest.raises(IncompatibleArtifactError, match="line 1, has format_version 2"):
        read_metrics(path)
