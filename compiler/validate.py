"""`recipe validate`: schema and cross-field checks. Reads no data and imports nothing heavy."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from compiler.assets import AssetError, load_catalog
from compiler.checks import check_recipe
from compiler.diagnostics import Diagnostic, RecipeError
from compiler.loader import LoadedRecipe, load_recipe
from compiler.overrides import Override


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
