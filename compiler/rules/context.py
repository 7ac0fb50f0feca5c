"""The shared rule context: the loaded recipe, where each key is, and facts every rule reads.

Rules are plain functions of a `Context` that return diagnostics; the helpers here also serve the
later phases that need the same facts (the architecture, a tokenizer's format, a data file's format).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from compiler.data.hub import HubError, hub_config
from compiler.diagnostics import Diagnostic, did_you_mean
from compiler.estimation.catalog import (
    CatalogError,
    ModelFacts,
    catalog_name_for_hub,
    facts_from_config,
    facts_from_config_json,
    load_model_facts,
    model_catalog,
)
from compiler.loading.loader import LoadedRecipe
from compiler.loading.recipe import FORMAT_FIELDS, Dataset, Recipe, ScratchModel, TokenizerSection

Key = tuple[str | int, ...]


@dataclass(frozen=True)
class Context:
    loaded: LoadedRecipe
    assets: dict[str, str]  # pinned asset name -> file name

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe

    def error(self, message: str, key: Key, help: str | None = None) -> Diagnostic:
        return Diagnostic("error", message, help=help, **self.loaded.where(key))

    def warning(self, message: str, key: Key, help: str | None = None) -> Diagnostic:
        return Diagnostic("warning", message, help=help, **self.loaded.where(key))

    def path(self, relative: str) -> Path:
        return resolve_data_path(self.loaded.path, relative)


def resolve_data_path(recipe_path: Path, path: str) -> Path:
    """Paths in a recipe are relative to the recipe file."""
    return (recipe_path.parent / path) if not Path(path).is_absolute() else Path(path)


def q(value: object) -> str:
    """A value quoted the way the user wrote it (JSON style, which TOML shares for strings)."""
    return json.dumps(value)


def suggest(word: str, choices: Iterable[str], noun: str) -> str:
    choices = sorted(set(choices))
    return did_you_mean(word, choices) or f"{noun}: {', '.join(choices) if choices else '(none)'}"


# ---------------------------------------------------------------------------------------------
# model and tokenizer


def model_facts(ctx: Context) -> tuple[ModelFacts | None, list[Diagnostic]]:
    """The architecture the recipe trains, or the diagnostics saying why it is unknown."""
    model = ctx.recipe.model
    if isinstance(model, ScratchModel):
        return scratch_facts(model), []
    if model.catalog is not None:
        if model.catalog not in model_catalog():
            return None, [
                ctx.error(
                    f"model.catalog = {q(model.catalog)} is not in the model catalog (specs/models)",
                    ("model", "catalog"),
                    suggest(model.catalog, model_catalog(), "catalog entries"),
                )
            ]
        return load_model_facts(model.catalog), []
    config = model.config
    if config is None and model.path is not None:
        config = str(Path(model.path) / "config.json")
    if config is not None:
        key = ("model", "config") if model.config is not None else ("model", "path")
        try:
            return facts_from_config_json(ctx.path(config), config), []
        except CatalogError as exc:
            return None, [ctx.error(str(exc), key, "point at the checkpoint's config.json, or name a catalog entry")]
    found = catalog_name_for_hub(model.hub) if model.hub else None
    if found is not None:
        return load_model_facts(found), []
    if model.hub is not None:
        try:
            return facts_from_config(hub_config(model.hub, model.revision), model.hub, f"config.json of {model.hub}",
                                     hub=model.hub), []
        except (HubError, CatalogError) as exc:
            return None, [ctx.error(str(exc), ("model", "hub"))]
    source = f"model.hub = {q(model.hub)}" if model.hub else f"model.asset = {q(model.asset)}"
    return None, [
        ctx.error(
            f"the architecture of {source} is unknown",
            ("model",),
            'add catalog = "<entry under specs/models>" or config = "path/to/config.json" to [model]',
        )
    ]


def scratch_facts(model: ScratchModel, n_positions: int = 1024, vocab_size: int = 50257) -> ModelFacts:
    return ModelFacts(
        name="scratch",
        family="gpt2",
        config={
            "model_type": "gpt2",
            "n_embd": model.n_embd,
            "n_layer": model.n_layer,
            "n_head": model.n_head,
            "n_positions": model.n_positions if isinstance(model.n_positions, int) else n_positions,
            "vocab_size": vocab_size,
        },
    )


def tokenizer_format(tok: TokenizerSection, assets: dict[str, str]) -> str:
    """The tokenizer file format: as written, else by the asset's file extension."""
    if tok.format is not None:
        return tok.format
    if tok.asset is not None:
        suffix = Path(assets.get(tok.asset, "")).suffix
        return {".tiktoken": "tiktoken", ".gguf": "gguf"}.get(suffix, "huggingface")
    return "huggingface"


# ---------------------------------------------------------------------------------------------
# data sets


def dataset_fields(ds: Dataset) -> set[str] | None:
    """Fields every row of `ds` has after renaming and deriving; None when only the file can tell."""
    if ds.format == "columns":
        if ds.columns is None:
            return None
        base = set(ds.columns) | set(ds.fields)
    else:  # a delimited file's named columns are fields too (derive may read them)
        base = set(FORMAT_FIELDS[ds.format]) | set(ds.columns or ())
    return base | {d.name for d in ds.derive}


def file_format(ds: Dataset) -> str:
    if ds.file_format != "auto":
        return ds.file_format
    name = ds.source.path or ""
    suffix = Path(name).suffix.lower().lstrip(".")
    return suffix if suffix in ("tsv", "csv", "json", "jsonl", "parquet") else "auto"
