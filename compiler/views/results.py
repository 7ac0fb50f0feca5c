"""The one line the CLI prints after `recipe run` and `recipe eval`, from eval.json."""

from __future__ import annotations

from pathlib import Path

from runtime.contract.artifacts import EvalReport


def eval_line(report: EvalReport, path: Path) -> str:
    """Held-out accuracy beside the majority-class baseline, or the loss and perplexity of a
    language-model eval (and the first metric of each lm-evaluation-harness task); `path` is where
    the report lies."""
    if report.accuracy is None:
        return (f"held-out loss {report.loss:.4f} (perplexity {report.perplexity:.2f}) on {report.n} "
                f"examples{harness_summary(report)}; report: {path}")
    acc, base = report.accuracy, report.majority_baseline
    return (f"held-out accuracy {acc:.1%} on {report.n} examples "
            f"(majority-class baseline {base:.1%}, {100 * (acc - base):+.1f} points); report: {path}")


def harness_summary(report: EvalReport) -> str:
    """`; harness: task acc 0.4000, ...`: each task's first metric that is not a standard error."""
    if not report.harness:
        return ""
    shown = []
    for task, metrics in report.harness["tasks"].items():
        first = next(((key, value) for key, value in metrics.items() if "_stderr," not in key), None)
        if first is not None:
            shown.append(f"{task} {first[0].split(',')[0]} {first[1]:.4f}")
    return "; harness: " + ", ".join(shown) if shown else ""
