"""`recipe validate`: schema and cross-field checks. Reads no data and imports nothing heavy."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from compiler.diagnostics import Diagnostic, RecipeError
from compiler.loading.loader import LoadedRecipe, load_recipe
from compiler.loading.overrides import Override
from compiler.rules.context import Context
from compiler.rules.data_rules import check_data_and_stages
from compiler.rules.grpo_rules import check_grpo_stages
from compiler.rules.model_rules import check_model_and_hardware
from runtime.contract.assets import AssetError, load_catalog


def check_recipe(loaded: LoadedRecipe, assets: dict[str, str]) -> list[Diagnostic]:
    """Every cross-field problem at once, each located in the recipe file, errors first.

    `assets` maps each pinned asset's name to its file name (which tells its format)."""
    ctx = Context(loaded=loaded, assets=dict(assets))
    out = check_model_and_hardware(ctx) + check_data_and_stages(ctx) + check_grpo_stages(ctx)
    unique = list(dict.fromkeys(out))  # two data sets sharing one template report its problems once
    return sorted(unique, key=lambda d: (d.severity != "error", d.line or 0, d.column or 0, d.message))


def validate(path: Path, overrides: Sequence[Override] = ()) -> tuple[LoadedRecipe, list[Diagnostic]]:
    """Return the loaded recipe and its warnings; raise RecipeError listing every error."""
    loaded = load_recipe(path, overrides)
    try:
        catalog = load_catalog()
    except AssetError as exc:
        raise RecipeError.single(str(exc)) from None
    diagnostics = check_recipe(loaded, {name: spec.filename for name, spec in catalog.items()})
    if any(d.severity == "error" for d in diagnostics):
        raise RecipeError(diagnostics)
    return loaded, diagnostics
