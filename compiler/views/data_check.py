"""The text report of `recipe data check`, rendered from `compiler.data.file_report.check_file`'s report."""

from __future__ import annotations

from typing import Any


def render_text(report: dict[str, Any], shown: str) -> str:
    lines = [f"{shown}: {report['n_examples']} examples"]
    if report["errors"]:
        lines.append("format errors:")
        lines += [f"  {category}: {count}" for category, count in report["errors"].items()]
        for p in report["problems"]:
            if p["severity"] == "error":
                lines.append(f"  line {p['line']}: {p['message']} [{p['category']}]")
    else:
        lines.append("no format errors")
    if report["warnings"]:
        lines.append("warnings:")
        lines += [f"  {category}: {count}" for category, count in report["warnings"].items()]
    for name, d in report["distributions"].items():
        if d:
            lines.append(f"{name.replace('_', ' ')}: min {d['min']}, max {d['max']}, mean {d['mean']}, "
                         f"median {d['median']}, p5 {d['p5']}, p95 {d['p95']}")
    lines.append(
        f"billing: {report['billing_tokens']:,} tokens (each example at most {report['token_limit']:,}) x "
        f"{report['epochs']} epochs at ${report['usd_per_1k_tokens']} per 1K tokens = ${report['cost_usd']:.2f}"
    )
    return "\n".join(lines) + "\n"
