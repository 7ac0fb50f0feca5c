"""`recipe data check FILE --format F`: format errors by category, warnings, token distributions,
and what fine-tuning on the file would bill (see `compiler.data.billing`), as one machine-readable
report (`compiler.views.data_check` renders it for people)."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean, median
from typing import Any, Sequence

from compiler.data.billing import (
    DEFAULT_TOKEN_LIMIT,
    DEFAULT_USD_PER_1K_TOKENS,
    billing_tokens,
    cost_usd,
    count_conversation,
    default_epochs,
)
from compiler.data.conversations import ConversationError, conversation
from compiler.data.read import read_dataset
from compiler.loading.recipe import Dataset


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "max": max(values), "mean": round(mean(values), 2), "median": median(values),
            "p5": round(quantile(values, 0.05), 2), "p95": round(quantile(values, 0.95), 2)}


def check_file(path: Path, fmt: str, encode, *, columns: list[str] | None = None, file_format: str = "auto",
               token_limit: int = DEFAULT_TOKEN_LIMIT, usd_per_1k_tokens: float = DEFAULT_USD_PER_1K_TOKENS,
               epochs: int | None = None) -> dict[str, Any]:
    """The machine-readable report; `encode(text) -> list[int]` (cl100k_base)."""
    ds = Dataset.model_validate({"source": {"path": str(path)}, "format": fmt, "file_format": file_format,
                                 "columns": columns})
    suffix = path.suffix.lower().lstrip(".")
    read_format = file_format if file_format != "auto" else (suffix if suffix in ("tsv", "csv", "json") else "jsonl")
    report = read_dataset([path], ds, read_format, str(path))
    totals, assistants, n_messages = [], [], []
    for row in report.rows:
        try:
            counted = count_conversation(conversation(row.fields, fmt, None), encode)
        except ConversationError:
            continue  # already reported by the checks
        totals.append(counted.total)
        assistants.append(counted.assistant)
        n_messages.append(counted.messages)
    warnings = report.counts("warning")
    over = sum(1 for n in totals if n > token_limit)
    if over:
        warnings["over_token_limit"] = over
    n_examples = report.n_records
    chosen_epochs = epochs if epochs is not None else default_epochs(max(1, n_examples))
    billing = billing_tokens(totals, token_limit)
    return {
        "n_examples": n_examples,
        "errors": report.counts("error"),
        "warnings": dict(sorted(warnings.items())),
        "distributions": {
            "messages_per_example": distribution(n_messages),
            "total_tokens_per_example": distribution(totals),
            "assistant_tokens_per_example": distribution(assistants),
        },
        "token_limit": token_limit,
        "billing_tokens": billing,
        "epochs": chosen_epochs,
        "usd_per_1k_tokens": usd_per_1k_tokens,
        "cost_usd": cost_usd(billing, chosen_epochs, usd_per_1k_tokens),
        "problems": [{"line": p.line, "category": p.category, "severity": p.severity, "message": p.message}
                     for p in report.problems[:50]],
    }
