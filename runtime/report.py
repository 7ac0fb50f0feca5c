"""The run report: what the plan predicted beside what the run measured.

Reads a trained build directory (`plan.json`, `train_report.json`, `metrics.jsonl` and, when
present, `eval.json`, each through its model in runtime.contract.artifacts) and writes
`run_report.json`, `run_report.md` rendered from it, and `loss.png`.
`python -m runtime.report BUILD_DIR` regenerates them.

Per stage, each quantity is `{"planned", "actual", "ratio"}` with ratio = actual / planned:

- `peak_memory_gib`: the plan's `memory.peak_gib` per device against the peak torch allocated on
  the GPU, or on CPU the process's resident set (RSS), which also holds the Python and torch
  runtime the plan does not count, so that ratio is indicative only (`measured` names the basis).
- `wall_s`: the plan's `compute.wall_s` against the stage's measured wall time.
- `tokens_per_s`: planned = the plan's `train_tokens` (non-pad tokens the stage processes,
  tokens per epoch x epochs) / `compute.wall_s`, both as plan.json shows them; actual = the
  runtime's tokens/s (non-pad tokens of all ranks per second).
- `steps`, `tokens`, `train_examples`, `params_total`, `params_trainable`: planned counts
  against what the runtime did and built.

Loss (first, final, lowest logged) and the compile-time truncation counts sit beside them; they
have no prediction. Missing files or fields give `None`, never an error, so older builds report
too; a file of another format version, or one that is not valid JSON, is an error.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from runtime.contract.artifacts import (
    PLAN_FORMAT_VERSION, RUN_REPORT_FORMAT_VERSION, Comparison, EvalReport, HeldoutBeforeAfter, HeldoutMetrics,
    IncompatibleArtifactError, LossSummary, MemoryComparison, MetricsRecord, Plan, PlanStage, RunEval, RunReport,
    RunStage, RunTotals, StageReport, TrainReport, Truncation, check_version, dumps, read_eval_report, read_plan,
    read_run_report, read_train_report, to_data,
)
from runtime.contract.files import write_atomic
from runtime.contract.metrics import read_eval_losses, read_metrics
from runtime.loss_plot import plot_loss
from runtime.contract.layout import (
    EVAL_JSON, LOSS_PNG, METRICS_FILE, PLAN_JSON, RUN_REPORT_JSON, RUN_REPORT_MD, RUNTIME_CONFIG_FILE,
    TRAIN_REPORT_FILE,
)

# Fewer logged points than this are drawn as they are: smoothing a handful of points hides them.
_MEMORY_BASIS = {
    "cuda_allocated": "Peak memory is what torch allocated on one GPU (torch.cuda.max_memory_allocated); "
    "the CUDA context the plan counts under overhead is not in it",
    "process_rss": "Peak memory is the resident set (RSS) of the training process: it also holds the "
    "Python interpreter, torch and the data besides the weights, gradients, optimizer state and "
    "activations the plan counts, so its ratio is indicative only",
}


class RunReportError(Exception):
    """The directory is not a build directory, or one of its files cannot be read."""


# ---------------------------------------------------------------------------------------------
# Reading the build directory


def _check_build_dir(build_dir: Path) -> None:
    if not ((build_dir / PLAN_JSON).is_file() or (build_dir / RUNTIME_CONFIG_FILE).is_file()):
        raise RunReportError(
            f"{build_dir} is not a build directory (no {PLAN_JSON} or {RUNTIME_CONFIG_FILE}; "
            f"run `recipe compile RECIPE --out {build_dir}` first)"
        )


def _read_if_present(path: Path, read):
    """The file through its reader, None when it is absent; RunReportError when it is unreadable."""
    if not path.is_file():
        return None
    try:
        return read(path)
    except IncompatibleArtifactError as exc:
        raise RunReportError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# The report as data


def _compare(planned: float | None, actual: float | None, digits: int | None = None) -> Comparison:
    """Planned and actual (rounded to `digits` when given: derived values) and actual / planned to
    4 significant digits, computed before rounding."""
    ratio = float(f"{actual / planned:.4g}") if planned and actual is not None else None
    if digits is not None:
        planned = round(planned, digits) if planned is not None else None
        actual = round(actual, digits) if actual is not None else None
    return Comparison(planned=planned, actual=actual, ratio=ratio)


def _peak_actual(device: str | None, report: StageReport | None,
                 records: list[MetricsRecord]) -> tuple[float | None, str | None]:
    """The measured peak and its basis; from train_report, else the largest value logged."""
    key, basis = ("peak_memory_gib", "cuda_allocated") if device == "cuda" else ("peak_rss_gib", "process_rss")
    value = getattr(report, key) if report is not None else None
    if value is None:
        logged = [v for v in (getattr(r, key) for r in records) if v is not None]
        value = max(logged) if logged else None
    return value, basis if value is not None else None


def _loss(report: StageReport | None, records: list[MetricsRecord]) -> LossSummary:
    losses = [(r.step, r.loss) for r in records]
    first = _finite(report.first_loss) if report is not None else None
    final = _finite(report.final_loss) if report is not None else None
    return LossSummary(
        first=first if first is not None else (losses[0][1] if losses else None),
        final=final if final is not None else (losses[-1][1] if losses else None),
        lowest_logged=min(loss for _, loss in losses) if losses else None,
        first_logged_step=losses[0][0] if losses else None,
        last_logged_step=losses[-1][0] if losses else None,
        logged_steps=len(losses),
    )


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _truncation(plan_stage: PlanStage | None, plan: Plan) -> Truncation | None:
    tokens = plan_stage.tokens if plan_stage is not None else None
    if tokens is None:
        return None
    train, heldout = tokens.train_examples, tokens.eval_examples
    data = plan.data.get(plan_stage.data) if plan_stage.data is not None else None
    budget = data.tokens if data is not None else None
    return Truncation(
        # Counted over the whole data set (train and held-out) when the compiler applied the budget.
        examples=train + heldout if train is not None and heldout is not None else None,
        n_positions=tokens.n_positions,
        truncated_examples=tokens.truncated_examples,
        label_truncated_examples=tokens.label_truncated_examples,
        dropped_examples=tokens.dropped_examples,
        tokens_removed=budget.tokens_removed if budget is not None else None,
    )


def _stage_entry(name: str, plan_stage: PlanStage | None, report: StageReport | None, records: list[MetricsRecord],
                 device: str | None, plan: Plan, evals: list[tuple[int, float]] = ()) -> RunStage:
    planned_wall = plan_stage.compute.wall_s if plan_stage is not None and plan_stage.compute else None
    planned_tokens = plan_stage.train_tokens if plan_stage is not None else None
    planned_rate = planned_tokens / planned_wall if planned_tokens is not None and planned_wall else None
    actual_rate = report.tokens_per_s if report is not None else None
    if actual_rate is None and report is not None and report.tokens is not None and report.wall_s:
        actual_rate = report.tokens / report.wall_s
    peak, basis = _peak_actual(device, report, records)
    params = plan_stage.params if plan_stage is not None else None
    planned_peak = plan_stage.memory.peak_gib if plan_stage is not None and plan_stage.memory else None
    kind = plan_stage.kind if plan_stage is not None and plan_stage.kind is not None else None
    adapter = plan_stage.adapter if plan_stage is not None and plan_stage.adapter is not None else None
    return RunStage(
        stage=name,
        kind=kind if kind is not None else (report.kind if report is not None else None),
        adapter=adapter if adapter is not None else (report.adapter if report is not None else None),
        ran=report is not None,
        **({"packing": report.packing} if report is not None and report.packing is not None else {}),
        **({key: getattr(report, key) for key in ("steady_tokens_per_s", "compile_s")
            if report is not None and getattr(report, key) is not None}),
        start_step=report.start_step if report is not None and report.start_step is not None
        else (0 if report is not None else None),
        peak_memory_gib=MemoryComparison(**_compare(planned_peak, peak).model_dump(), measured=basis),
        **({"probe_peak_gib": _compare(planned_peak, report.probe_peak_gib)}
           if report is not None and report.probe_peak_gib is not None else {}),
        wall_s=_compare(planned_wall, report.wall_s if report is not None else None),
        tokens_per_s=_compare(planned_rate, actual_rate, 1),
        steps=_compare(plan_stage.steps if plan_stage is not None else None,
                       report.steps if report is not None else None),
        tokens=_compare(planned_tokens, report.tokens if report is not None else None),
        train_examples=_compare(plan_stage.tokens.train_examples if plan_stage is not None and plan_stage.tokens
                                else None, report.examples if report is not None else None),
        params_total=_compare(params.total if params is not None else None,
                              report.params_total if report is not None else None),
        params_trainable=_compare(params.trainable if params is not None else None,
                                  report.params_trainable if report is not None else None),
        loss=_loss(report, records),
        truncation=_truncation(plan_stage, plan),
        heldout=report.heldout if report is not None else None,
        **_evaluations(evals),
        **({key: getattr(report, key) for key in ("kept_step", "stopped_at_step", "stop_reason")
            if report is not None and getattr(report, key) is not None}),
        **({"reward_steps": tuple(records)} if any(r.rewards is not None for r in records) else {}),
    )


def _evaluations(evals: list[tuple[int, float]]) -> dict[str, Any]:
    """The held-out losses logged during training: their count, the best (lowest, earliest) and last."""
    if not evals:
        return {}
    step, loss = min(evals, key=lambda point: (point[1], point[0]))
    return {"evaluations": len(evals), "best_eval_step": step, "best_eval_loss": loss, "last_eval_loss": evals[-1][1]}


def _totals(plan: Plan, stages: list[RunStage]) -> RunTotals:
    ran = [s for s in stages if s.ran]

    def actual_sum(key: str) -> float | None:
        values = [getattr(s, key).actual for s in ran]
        return sum(values) if values and None not in values else None

    wall, tokens = actual_sum("wall_s"), actual_sum("tokens")
    totals = plan.totals
    planned_wall = totals.wall_s if totals is not None else None
    planned_tokens = totals.train_tokens if totals is not None else None
    peaks = [s.peak_memory_gib.actual for s in ran if s.peak_memory_gib.actual is not None]
    return RunTotals(
        wall_s=_compare(planned_wall, wall, 2),
        tokens=_compare(planned_tokens, tokens),
        tokens_per_s=_compare(planned_tokens / planned_wall if planned_tokens is not None and planned_wall else None,
                              tokens / wall if tokens is not None and wall else None, 1),
        peak_memory_gib=_compare(totals.peak_gib if totals is not None else None, max(peaks) if peaks else None),
    )


def run_report(build_dir: Path) -> RunReport:
    """The plan's predictions beside what the run measured, per stage and in total (see the module
    docstring for each quantity). Raises RunReportError when `build_dir` is not a build directory
    or one of its files cannot be read."""
    build_dir = Path(build_dir)
    _check_build_dir(build_dir)
    plan = _read_if_present(build_dir / PLAN_JSON, read_plan) or Plan(format_version=PLAN_FORMAT_VERSION)
    train = _read_if_present(build_dir / TRAIN_REPORT_FILE, read_train_report) or TrainReport()
    evaluation: EvalReport | None = _read_if_present(build_dir / EVAL_JSON, read_eval_report)
    try:
        metrics = read_metrics(build_dir / METRICS_FILE)
    except IncompatibleArtifactError as exc:
        raise RunReportError(str(exc)) from exc
    evals = read_eval_losses(build_dir / METRICS_FILE)
    device = train.device if train.device is not None else (plan.hardware.device if plan.hardware else None)
    plan_stages = {s.name: s for s in plan.stages}
    ran = {s.stage: s for s in train.stages}
    names = list(dict.fromkeys([*plan_stages, *ran, *metrics]))  # plan order, then anything else that ran
    stages = [_stage_entry(n, plan_stages.get(n), ran.get(n), metrics.get(n, []), device, plan, evals.get(n, []))
              for n in names]
    world = train.world_size
    if world is None and plan.hardware is not None:
        nodes, procs = plan.hardware.nodes, plan.hardware.nproc_per_node
        world = nodes * procs if nodes is not None and procs is not None else None
    precision = train.precision if "precision" in train.model_fields_set else (
        plan.hardware.precision if plan.hardware else None)
    eval_keys = set(RunEval.model_fields) & (evaluation.model_fields_set if evaluation is not None else set())
    return RunReport(
        format_version=RUN_REPORT_FORMAT_VERSION,
        name=plan.name if plan.name is not None else build_dir.absolute().name,
        plan_summary=plan.summary,
        device=device,
        precision=precision,
        world_size=world,
        host_memory=train.host_memory,
        stages=stages,
        totals=_totals(plan, stages),
        eval=RunEval(**{k: getattr(evaluation, k) for k in sorted(eval_keys)})
        if evaluation is not None and evaluation.model_fields_set else None,
    )


def build_run_report(build_dir: Path) -> dict[str, Any]:
    """`run_report(build_dir)` as the JSON data run_report.json holds."""
    return to_data(run_report(build_dir))


# ---------------------------------------------------------------------------------------------
# The loss plot


# ---------------------------------------------------------------------------------------------
# Markdown, rendered from the JSON report


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}" if 0.1 <= ratio < 100 else f"{ratio:.3g}"


def _stage_markdown(stage: RunStage) -> Iterable[str]:
    yield f"## Stage `{stage.stage}` ({stage.kind or '?'}, adapter {stage.adapter or '?'})"
    yield ""
    if not stage.ran:
        yield "Not in train_report.json: the stage has not run (or the run stopped before its end)."
        yield ""
    memory = stage.peak_memory_gib
    memory_label = {"process_rss": "peak memory, GiB (process RSS)",
                    "cuda_allocated": "peak memory, GiB (CUDA allocated)"}.get(memory.measured, "peak memory, GiB")
    rows = [
        (memory_label, memory, ".3f"),
        ("tokens/s", stage.tokens_per_s, ",.1f"),
        ("wall time, s", stage.wall_s, ",.1f"),
        ("steps", stage.steps, ","),
        ("tokens", stage.tokens, ","),
        ("training examples", stage.train_examples, ","),
        ("parameters", stage.params_total, ","),
        ("trainable parameters", stage.params_trainable, ","),
    ]
    if stage.probe_peak_gib is not None:
        rows.insert(1, ("longest micro-batch before the first step, GiB", stage.probe_peak_gib, ".3f"))
    yield "| quantity | planned | actual | actual/planned |"
    yield "|---|---:|---:|---:|"
    for label, entry, spec in rows:
        planned, actual, ratio = _fmt(entry.planned, spec), _fmt(entry.actual, spec), _fmt_ratio(entry.ratio)
        yield f"| {label} | {planned} | {actual} | {ratio} |"
    yield ""
    notes = []
    loss = stage.loss
    if loss.first is not None:
        notes.append(f"Loss {loss.first:.4f} -> {_fmt(loss.final, '.4f')} (lowest logged "
                     f"{_fmt(loss.lowest_logged, '.4f')}; {loss.logged_steps} logged steps).")
    if stage.start_step:
        notes.append(f"Resumed from a checkpoint at step {stage.start_step}.")
    if stage.compile_s is not None:
        notes.append(f"torch.compile took {stage.compile_s:.1f} s in the first step; the steps after it ran at "
                     f"{stage.steady_tokens_per_s:,.1f} tokens/s.")
    note = _heldout_note(stage.heldout)
    if note:
        notes.append(note)
    if stage.evaluations:
        notes.append(f"Held-out loss during training ({stage.evaluations} evaluations): best "
                     f"{stage.best_eval_loss:.4f} at step {stage.best_eval_step}, last {stage.last_eval_loss:.4f}.")
    if stage.stopped_at_step is not None:
        notes.append(f"Stopped early at step {stage.stopped_at_step}: {stage.stop_reason}.")
    if stage.kept_step is not None:
        notes.append(f"save_best: the output holds the weights of step {stage.kept_step}, the best evaluation.")
    t = stage.truncation
    if t is not None:
        of = f" of {t.examples:,}" if t.examples is not None else ""
        removed = f" ({t.tokens_removed:,} tokens removed)" if t.tokens_removed is not None else ""
        notes.append(f"Compile-time budget {_fmt(t.n_positions, ',')} tokens: "
                     f"{_fmt(t.truncated_examples, ',')}{of} examples truncated{removed}, "
                     f"{_fmt(t.label_truncated_examples, ',')} lost supervised tokens, "
                     f"{_fmt(t.dropped_examples, ',')} dropped.")
    for note in notes:
        yield f"- {note}"
    if notes:
        yield ""
    yield from _reward_steps_markdown(stage.reward_steps or ())


def _reward_steps_markdown(records) -> Iterable[str]:
    """GRPO's logged steps: reward (each function's mean), groups without signal, KL, clipping, length."""
    if not records:
        return
    names = sorted({k for r in records for k in (r.rewards or {})})
    yield "| step | reward | " + " | ".join(names) + " | zero-variance groups | KL | clip fraction | completion tokens |"
    yield "|" + "---:|" * (6 + len(names))
    for r in records:
        cells = [_fmt(r.reward_mean, ".3f")] + [_fmt((r.rewards or {}).get(n), ".3f") for n in names]
        cells += [_fmt(r.zero_std_share, ".2f"), _fmt(r.kl, ".4f"), _fmt(r.clipfrac, ".3f"), _fmt(r.completion_tokens, ".1f")]
        yield f"| {r.step} | " + " | ".join(cells) + " |"
    yield ""


def _heldout_note(heldout: HeldoutBeforeAfter | HeldoutMetrics | None) -> str | None:
    """Reward and DPO held-out accuracy and margin, PPO's mean held-out reward, before -> after."""
    if heldout is None:
        return None
    before, after = (heldout.before, heldout.after) if isinstance(heldout, HeldoutBeforeAfter) else (None, heldout)
    if after is None:
        return None
    if after.rewards is not None:  # grpo: greedy completions scored by the stage's rewards
        acc = (f"accuracy {_fmt(before.accuracy, '.4f') + ' -> ' if before else ''}{_fmt(after.accuracy, '.4f')}, "
               if after.accuracy is not None else "")
        return (f"Held-out greedy completions ({after.prompts} prompts): {acc}mean reward "
                f"{_fmt(before.mean_reward, '.4f') + ' -> ' if before else ''}{_fmt(after.mean_reward, '.4f')}.")
    if "mean_reward" in after.model_fields_set:
        start = f"{_fmt(before.mean_reward, '.4f')} -> " if before is not None else ""
        return (f"Held-out mean reward of sampled completions ({after.prompts} prompts): "
                f"{start}{_fmt(after.mean_reward, '.4f')}.")
    if "accuracy" in after.model_fields_set:
        start = f"{_fmt(before.accuracy, '.4f')} -> " if before is not None else ""
        return (f"Held-out preference accuracy ({after.pairs} pairs): {start}{_fmt(after.accuracy, '.4f')}, "
                f"mean margin {_fmt(after.mean_margin, '.4f')}.")
    return None


def _eval_markdown(evaluation: RunEval) -> str:
    parts = []
    accuracy, baseline = evaluation.accuracy, evaluation.majority_baseline
    if accuracy is not None:
        n = evaluation.n
        text = f"accuracy {accuracy:.1%}" + (f" on {int(n):,} examples" if n is not None else "")
        if baseline is not None:
            text += f" (majority-class baseline {baseline:.1%}, {100 * (accuracy - baseline):+.1f} points)"
        parts.append(text)
    for key, label in (("macro_f1", "macro-F1"), ("loss", "completion loss"), ("perplexity", "perplexity")):
        if getattr(evaluation, key) is not None:
            parts.append(f"{label} {getattr(evaluation, key):.4f}")
    return "Held-out evaluation: " + ", ".join(parts) + "." if parts else ""


def summary_line(report: RunReport | Mapping[str, Any]) -> str:
    """One line: the run's totals beside the plan's. `report` is a RunReport or its JSON data (the
    contents of run_report.json), which is read through the model."""
    if not isinstance(report, RunReport):
        check_version(RUN_REPORT_JSON, dict(report), RUN_REPORT_FORMAT_VERSION, required=True)
        report = RunReport.model_validate(report)
    totals = report.totals
    n = sum(1 for s in report.stages if s.ran)
    parts = [f"{n} stage{'s' * (n != 1)} run"]
    wall, rate, peak = totals.wall_s, totals.tokens_per_s, totals.peak_memory_gib
    if wall.actual is not None:
        parts.append(f"{wall.actual:,.1f} s (planned {_fmt(wall.planned, ',.1f')} s)")
    if rate.actual is not None:
        parts.append(f"{rate.actual:,.0f} tokens/s (planned {_fmt(rate.planned, ',.0f')})")
    if peak.actual is not None:
        parts.append(f"peak {peak.actual:.2f} GiB (planned {_fmt(peak.planned, '.2f')})")
    return "Run: " + ", ".join(parts)


def render_markdown(report: RunReport, *, loss_png: str | None) -> str:
    """run_report.md is a pure function of run_report.json (and whether the loss plot exists)."""
    lines = [f"# Run report: {report.name}", ""]
    if report.plan_summary:
        lines += [f"{report.plan_summary}", ""]
    lines += [f"Ran on {report.device or '?'}, {report.precision or '?'}, "
              f"{_fmt(report.world_size, ',')} process(es).", ""]
    for stage in report.stages:
        lines += _stage_markdown(stage)
    if report.eval:
        line = _eval_markdown(report.eval)
        lines += [line, ""] if line else []
    if loss_png:
        lines += [f"![loss]({loss_png})", ""]
    bases = list(dict.fromkeys(s.peak_memory_gib.measured for s in report.stages))
    for basis in bases:
        if basis:
            lines += [f"{_MEMORY_BASIS[basis]}.", ""]
    if report.host_memory == "reuse" and "process_rss" in bases:
        lines += ['Under hardware.host_memory = "reuse" freed blocks stay in the C library\'s heap for the next '
                  "allocation, so the resident set runs above the tensors alive (by 30% or more).", ""]
    lines += ["Planned tokens/s is the plan's training tokens over its wall time; wall time is the plan's "
              "FLOPs at the device's assumed utilisation.", ""]
    lines.append(summary_line(report))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Writing


def write_run_report(build_dir: Path) -> tuple[Path, Path]:
    """Write `loss.png` (when losses were logged), `run_report.json` and `run_report.md` into the
    build directory; returns the paths of the JSON and markdown reports."""
    build_dir = Path(build_dir)
    report = run_report(build_dir)
    png = plot_loss(build_dir / METRICS_FILE, build_dir / LOSS_PNG)
    json_path, md_path = build_dir / RUN_REPORT_JSON, build_dir / RUN_REPORT_MD
    write_atomic(json_path, dumps(report).encode())
    write_atomic(md_path, render_markdown(report, loss_png=png.name if png else None).encode())
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.report",
        description="Write run_report.json, run_report.md and loss.png for a trained build directory.",
    )
    parser.add_argument("build_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        json_path, md_path = write_run_report(args.build_dir)
    except RunReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = read_run_report(json_path)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    print(summary_line(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
