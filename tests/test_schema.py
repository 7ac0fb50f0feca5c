"""The exported JSON Schema: committed copy equals the export, and every recipe validates with it."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import jsonschema
import pytest

from compiler.loading.schema import recipe_json_schema, recipe_schema
from tests.conftest import REPO, base_recipe, run_cli

SCHEMA_FILE = REPO / "specs" / "recipe.schema.json"
RECIPES = sorted((REPO / "specs").rglob("*.toml"))
EXAMPLES = sorted((REPO / "specs" / "examples").glob("*.toml"))


def test_committed_schema_equals_the_export() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == recipe_json_schema(), (
        "specs/recipe.schema.json is stale: run `recipe schema --out specs/recipe.schema.json`"
    )


def test_schema_command_prints_the_export(tmp_path: Path) -> None:
    result = run_cli("schema")
    assert result.returncode == 0
    assert result.stdout == recipe_json_schema()


def test_the_schema_is_itself_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(recipe_schema())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_recipe_validates_against_the_schema(path: Path) -> None:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    jsonschema.validate(data, recipe_schema())


def test_every_recipe_under_specs_is_checked() -> None:
    # specs/ holds recipes (examples) and catalogs (models, hardware, assets); only recipes are validated.
    recipes = [p for p in RECIPES if p.parent.name == "examples"]
    assert len(recipes) == len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_carries_the_editor_schema_hint(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first == "#:schema ../recipe.schema.json"
    assert (path.parent / "../recipe.schema.json").resolve() == SCHEMA_FILE


def test_schema_rejects_what_the_loader_rejects() -> None:
    recipe = base_recipe()
    recipe["train"]["learnig_rate"] = 1e-3
    with pytest.raises(jsonschema.ValidationError, match="learnig_rate"):
        jsonschema.validate(recipe, recipe_schema())
    recipe = base_recipe()
    recipe["stages"][0]["kind"] = "sftt"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(recipe, recipe_schema())


def test_descriptions_are_written_for_users() -> None:
    schema = recipe_schema()
    missing = []
    for name, definition in schema["$defs"].items():
        for key, prop in definition.get("properties", {}).items():
            if not prop.get("description"):
                missing.append(f"{name}.{key}")
    for key, prop in schema["properties"].items():
        if not prop.get("description"):
            missing.append(key)
    assert missing == []


def test_json_recipe_may_name_its_schema(tmp_path: Path) -> None:
    recipe = {"$schema": "../specs/recipe.schema.json", **base_recipe()}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    result = run_cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
