"""plan.md, rendered from plan.json alone, and the one summary line it ends with."""

from __future__ import annotations

from typing import Any, Sequence

import jinja2

from runtime.contract.paths import templates_dir


def render_markdown(plan: dict[str, Any]) -> str:
    """plan.md is a pure function of plan.json."""
    return _environment().get_template("plan.md.j2").render(plan=plan)


def summary_line(stages: Sequence[dict[str, Any]], totals: dict[str, Any], device: str) -> str:
    """The plan's last line: stages, tokens, FLOPs, time or cost, and peak memory per device."""
    n = len(stages)
    bound = "" if all(s["tokens_measured"] for s in stages) else "at most "
    parts = [f"{n} stage{'s' * (n != 1)}", f"{bound}{si(totals['train_tokens'])} tokens",
             f"{bound}{si(totals['flops'])}FLOP"]
    if totals["wall_s"] is not None:
        if device == "cuda":
            parts.append(f"{totals['gpu_hours']:.1f} GPU-h, ~${totals['cost_usd']:.2f}")
        else:
            parts.append(f"~{duration(totals['wall_s'])} on {device}")
    memory = f"peak {totals['peak_gib']:.2f}"
    memory += f"/{totals['device_gib']:.0f} GiB per device" if totals["device_gib"] else f" GiB per {device} device"
    if totals["fits"] is False:
        memory += " (does not fit)"
    return f"Plan: {', '.join(parts)}; {memory}"


def duration(seconds: float) -> str:
    """A wall time for people: seconds, minutes or hours."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def si(value: float) -> str:
    """A count with an SI prefix: 4.1M, 1.2T."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["si"] = si
    env.filters["thousands"] = lambda v: f"{v:,}"
    env.filters["duration"] = lambda v: "-" if v is None else duration(v)
    return env
