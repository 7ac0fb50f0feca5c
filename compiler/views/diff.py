"""`recipe diff` for people: the changes as text for a terminal, or markdown for a pull-request comment."""

from __future__ import annotations

import json
from typing import Any

from compiler.review.diff import Change


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return json.dumps(value) if not isinstance(value, str) else value


def _delta(before: Any, after: Any) -> str:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after))
    if not numbers or before in (0, None):
        return ""
    change = after - before
    return f"{'+' if change > 0 else ''}{_show(change)} ({change / abs(before):+.1%})"


def render_text(settings: list[Change], figures: list[Change], before_summary: str, after_summary: str) -> str:
    lines = ["Legend: + added, - removed, ~ changed", ""]
    if not settings and not figures:
        return "No changes: the recipes plan the same run.\n"
    if settings:
        lines.append("Recipe settings:")
        lines += [f"  {c.sign} {c.where}: {_show(c.before)} -> {_show(c.after)}" for c in settings]
        lines.append("")
    if figures:
        lines.append("Plan:")
        for c in figures:
            delta = _delta(c.before, c.after)
            lines.append(f"  {c.sign} {c.where}: {_show(c.before)} -> {_show(c.after)}{'  ' + delta if delta else ''}")
        lines.append("")
    lines += [f"before: {before_summary}", f"after:  {after_summary}"]
    return "\n".join(lines) + "\n"


def render_markdown(settings: list[Change], figures: list[Change], before_summary: str, after_summary: str) -> str:
    if not settings and not figures:
        return "**recipe diff**: no changes; the recipes plan the same run.\n"
    lines = ["### recipe diff", "", "`+` added, `-` removed, `~` changed", ""]
    if figures:
        lines += ["| | plan | before | after | change |", "|---|---|---|---|---|"]
        lines += [f"| `{c.sign}` | {c.where} | {_show(c.before)} | {_show(c.after)} | {_delta(c.before, c.after)} |"
                  for c in figures]
        lines.append("")
    if settings:
        lines += ["| | setting | before | after |", "|---|---|---|---|"]
        lines += [f"| `{c.sign}` | `{c.where}` | {_show(c.before)} | {_show(c.after)} |" for c in settings]
        lines.append("")
    lines += [f"- before: {before_summary}", f"- after: {after_summary}", ""]
    return "\n".join(lines)
