"""Cross-field rules a schema cannot express. Each returns diagnostics; none sets defaults."""

from __future__ import annotations

from pathlib import Path

from compiler.diagnostics import Diagnostic, did_you_mean
from compiler.loader import LoadedRecipe
from compiler.templating import TemplateError, compile_template


def check_recipe(loaded: LoadedRecipe, asset_names: set[str]) -> list[Diagnostic]:
    """Every cross-field problem at once, each located in the recipe file."""
    r = loaded.recipe
    out: list[Diagnostic] = []
    out += _check_assets(loaded, asset_names)
    out += _check_source_path(loaded)
    known = _known_fields(loaded)
    variables: dict[str, frozenset[str]] = {}
    for part in ("prompt", "completion"):
        try:
            variables[part] = compile_template(getattr(r.template, part)).variables
        except TemplateError as exc:
            out.append(Diagnostic("error", f"template.{part}: {exc}", **loaded.where(("template", part))))
    if known is not None:
        for part, names in variables.items():
            for name in sorted(names - known):
                out.append(
                    Diagnostic(
                        "error",
                        f"template.{part} uses {{{{ {name} }}}} but the data has no field {name!r}",
                        help=did_you_mean(name, known) or f"fields available: {', '.join(sorted(known))}",
                        **loaded.where(("template", part)),
                    )
                )
        if r.eval.label_field not in known:
            out.append(
                Diagnostic(
                    "error",
                    f"eval.label_field = {r.eval.label_field!r} is not a field of the data",
                    help=did_you_mean(r.eval.label_field, known) or f"fields: {', '.join(sorted(known))}",
                    **loaded.where(("eval", "label_field")),
                )
            )
        for i, derive in enumerate(r.data.derive):
            earlier = set(r.data.columns or []) | {d.name for d in r.data.derive[:i]}
            if r.data.columns is not None and derive.source not in earlier:
                out.append(
                    Diagnostic(
                        "error",
                        f"data.derive[{i}] reads {derive.source!r}, which is not a column",
                        help=did_you_mean(derive.source, earlier),
                        **loaded.where(("data", "derive", i, "from")),
                    )
                )
    for i, name in enumerate(r.budget.truncatable):
        if "prompt" in variables and name not in variables["prompt"]:
            out.append(
                Diagnostic(
                    "error",
                    f"budget.truncatable names {name!r}, which template.prompt does not use",
                    help=did_you_mean(name, variables["prompt"]),
                    **loaded.where(("budget", "truncatable")),
                )
            )
        if name in variables.get("completion", ()):
            out.append(
                Diagnostic(
                    "error",
                    f"budget.truncatable names {name!r}, which template.completion uses; "
                    "the completion is never truncated",
                    help=f"remove {name!r} from budget.truncatable",
                    **loaded.where(("budget", "truncatable")),
                )
            )
    if r.tokenizer.eos_token not in r.tokenizer.special_tokens:
        out.append(
            Diagnostic(
                "error",
                f"tokenizer.eos_token = {r.tokenizer.eos_token!r} is not in tokenizer.special_tokens",
                help=f'add {{ "{r.tokenizer.eos_token}" = ID }} to tokenizer.special_tokens',
                **loaded.where(("tokenizer", "eos_token")),
            )
        )
    n_pos, total = r.model.n_positions, r.budget.max_total_tokens
    if isinstance(n_pos, int) and isinstance(total, int) and total > n_pos:
        out.append(
            Diagnostic(
                "error",
                f"budget.max_total_tokens = {total} exceeds model.n_positions = {n_pos}",
                help='set model.n_positions = "auto" to size the model from the budget',
                **loaded.where(("budget", "max_total_tokens")),
            )
        )
    if r.hardware.device == "cpu" and r.hardware.gpu is not None:
        out.append(
            Diagnostic(
                "error",
                f'hardware.gpu = {r.hardware.gpu!r} needs hardware.device = "cuda"',
                **loaded.where(("hardware", "gpu")),
            )
        )
    return out


def _known_fields(loaded: LoadedRecipe) -> set[str] | None:
    """Fields every row will have, when the recipe declares its columns (else known after reading)."""
    data = loaded.recipe.data
    if data.columns is None:
        return None
    return set(data.columns) | {d.name for d in data.derive}


def _check_assets(loaded: LoadedRecipe, asset_names: set[str]) -> list[Diagnostic]:
    r = loaded.recipe
    wanted = [(("tokenizer", "asset"), r.tokenizer.asset)]
    if r.data.source.asset is not None:
        wanted.append((("data", "source", "asset"), r.data.source.asset))
    out = []
    for key, name in wanted:
        if name not in asset_names:
            out.append(
                Diagnostic(
                    "error",
                    f"{'.'.join(key)} = {name!r} is not a pinned asset",
                    help=did_you_mean(name, asset_names) or f"known assets: {', '.join(sorted(asset_names))}",
                    **loaded.where(key),
                )
            )
    return out


def _check_source_path(loaded: LoadedRecipe) -> list[Diagnostic]:
    path = loaded.recipe.data.source.path
    if path is None:
        return []
    resolved = resolve_data_path(loaded.path, path)
    if not resolved.is_file():
        return [
            Diagnostic(
                "error",
                f"data.source.path = {path!r} not found (looked at {resolved})",
                help="paths are relative to the recipe file",
                **loaded.where(("data", "source", "path")),
            )
        ]
    return []


def resolve_data_path(recipe_path: Path, path: str) -> Path:
    return (recipe_path.parent / path) if not Path(path).is_absolute() else Path(path)
