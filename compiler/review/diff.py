"""`recipe diff`: what a recipe change does to the plan, for review (like `infracost diff`).

Two plans are compared stage by stage (+ added, - removed, ~ changed) on the figures a reviewer
weighs: context length, training tokens, trainable parameters, peak memory per device and its
headroom, GPU-hours and dollars; the recipe settings that changed are listed too.
`compiler.views.diff` renders the changes as text or markdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# (label, path into a plan stage, unit); the order of the report.
STAGE_FIGURES = (
    ("n_positions", ("tokens", "n_positions"), ""),
    ("train tokens", ("train_tokens",), ""),
    ("total params", ("params", "total"), ""),
    ("active params", ("params", "active"), ""),
    ("trainable params", ("params", "trainable"), ""),
    ("peak memory", ("memory", "peak_gib"), " GiB"),
    ("headroom", ("memory", "headroom_gib"), " GiB"),
    ("GPU-hours", ("compute", "gpu_hours"), ""),
    ("cost", ("compute", "cost_usd"), " $"),
)


@dataclass(frozen=True)
class Change:
    sign: str  # "+", "-" or "~"
    where: str
    before: Any
    after: Any


def _get(node: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.learning_rate": 1e-4, "stages.sft.kind": "sft", ...}; stages keyed by name."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        out = {}
        for item in value:
            out.update(flatten({k: v for k, v in item.items() if k != "name"}, f"{prefix}{item['name']}."))
        return out
    return {prefix.rstrip("."): value}


def setting_changes(before: dict[str, Any], after: dict[str, Any]) -> list[Change]:
    a, b = flatten(before), flatten(after)
    out = []
    for key in sorted(set(a) | set(b)):
        if key not in a:
            out.append(Change("+", key, None, b[key]))
        elif key not in b:
            out.append(Change("-", key, a[key], None))
        elif a[key] != b[key]:
            out.append(Change("~", key, a[key], b[key]))
    return out


def plan_changes(before: dict[str, Any], after: dict[str, Any]) -> list[Change]:
    old = {s["name"]: s for s in before["stages"]}
    new = {s["name"]: s for s in after["stages"]}
    out = []
    for name in list(old) + [n for n in new if n not in old]:
        if name not in new:
            out.append(Change("-", f"stage {name}", old[name]["kind"], None))
            continue
        if name not in old:
            out.append(Change("+", f"stage {name}", None, new[name]["kind"]))
            continue
        for label, path, _ in STAGE_FIGURES:
            a, b = _get(old[name], path), _get(new[name], path)
            if a != b:
                out.append(Change("~", f"{name}: {label}", a, b))
    for label, key in (("total GPU-hours", "gpu_hours"), ("total cost", "cost_usd"), ("peak memory", "peak_gib")):
        a, b = before["totals"].get(key), after["totals"].get(key)
        if a != b:
            out.append(Change("~", label, a, b))
    return out
