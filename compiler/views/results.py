"""The one line the CLI prints after `recipe run` and `recipe eval`, from eval.json."""

from __future__ import annotations

from pathlib import Path

from runtime.contract.artifacts import EvalReport


def eval_line(report: EvalReport, path: Path) -> str:
    """Held-out accuracy beside the majority-class baseline, or the loss and perplexity of a
    language-model eval; `path` is where the report lies."""
    if report.accuracy is None:
        return (f"held-out loss {report.loss:.4f} (perplexity {report.perplexity:.2f}) on {report.n} "
                f"examples; report: {path}")
    acc, base = report.accuracy, report.majority_baseline
    return (f"held-out accuracy {acc:.1%} on {report.n} examples "
            f"(majority-class baseline {base:.1%}, {100 * (acc - base):+.1f} points); report: {path}")
