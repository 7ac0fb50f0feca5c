"""`recipe check`: the plan against the recipe's [budget] limits, for CI and pre-commit hooks."""

from __future__ import annotations

from typing import Any

from compiler.diagnostics import Diagnostic
from compiler.loading.loader import LoadedRecipe


def budget_violations(loaded: LoadedRecipe, plan: dict[str, Any]) -> list[Diagnostic]:
    """Every limit the plan exceeds, located at the limit in the recipe; a stage that does not
    fit its device is always a violation."""
    budget = loaded.recipe.budget
    totals = plan["totals"]
    out = []
    for stage in plan["stages"]:
        memory = stage["memory"]
        if memory["fits"] is False:
            best = next((s for s in memory["suggestions"] if s["fits"]), None)
            out.append(Diagnostic(
                "error", f'stage "{stage["name"]}" needs {memory["peak_gib"]:.1f} GiB per device; '
                f'{memory["device_gib"]} GiB available', help=f"for example: {best['change']}" if best else None,
                **loaded.where(("hardware",))))
        if budget.min_memory_headroom_gib is not None and memory["headroom_gib"] is not None:
            if memory["headroom_gib"] < budget.min_memory_headroom_gib:
                out.append(Diagnostic(
                    "error", f'stage "{stage["name"]}" leaves {memory["headroom_gib"]:.1f} GiB free per device, '
                    f"less than budget.min_memory_headroom_gib = {budget.min_memory_headroom_gib}",
                    **loaded.where(("budget", "min_memory_headroom_gib"))))
    if budget.max_usd is not None and totals["cost_usd"] is not None and totals["cost_usd"] > budget.max_usd:
        out.append(Diagnostic("error", f"the plan costs ${totals['cost_usd']:.2f}, more than budget.max_usd = "
                              f"{budget.max_usd}", **loaded.where(("budget", "max_usd"))))
    if (budget.max_gpu_hours is not None and totals["gpu_hours"] is not None
            and totals["gpu_hours"] > budget.max_gpu_hours):
        out.append(Diagnostic("error", f"the plan takes {totals['gpu_hours']:.2f} GPU-hours, more than "
                              f"budget.max_gpu_hours = {budget.max_gpu_hours}", **loaded.where(("budget", "max_gpu_hours"))))
    return out
