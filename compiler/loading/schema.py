"""The recipe's JSON Schema, exported from the pydantic models.

Editors use it for completion and hover docs: TOML recipes start with a `#:schema` comment that
Taplo-based language servers (e.g. Even Better TOML) read; JSON recipes can set "$schema".
`specs/recipe.schema.json` is the committed export; a test fails when it drifts.
"""

from __future__ import annotations

import json
from typing import Any

from compiler.loading.recipe import Recipe

def recipe_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema(by_alias=True)
    # A JSON recipe may name its schema; that key is not a recipe setting.
    schema["properties"] = {"$schema": {"type": "string", "description": "Path or URL of this schema."},
                            **schema["properties"]}
    return _one_line_descriptions({"$schema": "https://json-schema.org/draft/2020-12/schema", **schema})


def _one_line_descriptions(node: Any) -> Any:
    """Docstrings wrap at 110 columns; editors show descriptions as flowing text."""
    if isinstance(node, dict):
        return {k: (" ".join(v.split()) if k == "description" and isinstance(v, str) else _one_line_descriptions(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_one_line_descriptions(v) for v in node]
    return node


def recipe_json_schema() -> str:
    return json.dumps(recipe_schema(), indent=2, ensure_ascii=False) + "\n"
