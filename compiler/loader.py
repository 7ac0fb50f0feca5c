"""Read a recipe file (TOML or JSON) into a validated, frozen `Recipe`.

Every problem is collected and reported at once, each with file, line, column and key path.
"""

from __future__ import annotations

import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from compiler.diagnostics import Diagnostic, RecipeError, did_you_mean
from compiler.recipe import Recipe
from compiler.source_map import SourceMap, json_source_map, toml_source_map


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    text: str
    source_map: SourceMap

    def where(self, key: tuple[str | int, ...]) -> dict[str, Any]:
        """Keyword arguments locating `key` for a Diagnostic."""
        pos, _ = self.source_map.locate(key)
        line, column = pos if pos else (None, None)
        return {
            "file": display_path(self.path),
            "line": line,
            "column": column,
            "key": ".".join(str(k) for k in key) or None,
            "source_line": self.source_map.line_text(line) if line else None,
        }


def display_path(path: Path) -> str:
    """The path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def parse_document(path: Path) -> tuple[dict[str, Any], str, SourceMap]:
    """Parse TOML or JSON (by extension) and map its keys to positions."""
    shown = display_path(path)
    if not path.is_file():
        raise RecipeError.single(
            f"recipe file {shown} not found", help="check the path; recipes usually live under specs/"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError.single(f"cannot read {shown}: {exc}", file=shown) from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            line, col = _toml_error_position(str(exc))
            lines = text.splitlines()
            reason = re.sub(r" \(at line \d+, column \d+\)", "", str(exc))
            raise RecipeError.single(
                f"invalid TOML: {reason}",
                file=shown,
                line=line,
                column=col,
                source_line=lines[line - 1] if line and line <= len(lines) else None,
            ) from None
        return data, text, toml_source_map(text)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            lines = text.splitlines()
            raise RecipeError.single(
                f"invalid JSON: {exc.msg}",
                file=shown,
                line=exc.lineno,
                column=exc.colno,
                source_line=lines[exc.lineno - 1] if exc.lineno <= len(lines) else None,
            ) from None
        if not isinstance(data, dict):
            raise RecipeError.single(
                f"the top level of {shown} must be an object, found {type(data).__name__}", file=shown, line=1
            )
        return data, text, json_source_map(text)
    raise RecipeError.single(
        f"{shown}: unsupported recipe format {suffix or '(no extension)'!r}",
        help="write the recipe as .toml or .json",
    )


def _toml_error_position(message: str) -> tuple[int | None, int | None]:
    m = re.search(r"at line (\d+), column (\d+)", message)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def load_recipe(path: Path) -> LoadedRecipe:
    """Parse and validate; raise RecipeError with every schema problem found."""
    path = Path(path)
    data, text, smap = parse_document(path)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_diagnostics_from(exc, display_path(path), smap)) from None
    return LoadedRecipe(recipe=recipe, path=path, text=text, source_map=smap)


# ---------------------------------------------------------------------------------------------
# pydantic errors -> diagnostics


def _diagnostics_from(exc: ValidationError, file: str, smap: SourceMap) -> list[Diagnostic]:
    grouped: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for err in exc.errors():
        loc = err["loc"]
        if err["type"] == "extra_forbidden":  # the last segment is the unknown key itself
            real, branch = _real_path(Recipe, loc[:-1])
            real += (str(loc[-1]),)
        else:
            real, branch = _real_path(Recipe, loc)
        err = {**err, "branch": branch}
        grouped.setdefault(real, []).append(err)
    out = []
    for real, errs in grouped.items():
        out.append(_diagnostic(real, errs, file, smap))
    out.sort(key=lambda d: (d.line or 0, d.column or 0, d.message))
    return out


def _diagnostic(real: tuple[str, ...], errs: list[dict[str, Any]], file: str, smap: SourceMap) -> Diagnostic:
    pos, _ = smap.locate(real)
    line, column = pos if pos else (None, None)
    where = dict(
        file=file,
        line=line,
        column=column,
        key=".".join(real) or None,
        source_line=smap.line_text(line) if line else None,
    )
    table = f"[{'.'.join(real[:-1])}]" if len(real) > 1 else "the top level"
    err = errs[0]
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(Recipe, real[:-1])
        return Diagnostic(
            "error",
            f'unknown key "{real[-1]}" in {table}',
            help=did_you_mean(real[-1], allowed) or f"allowed keys: {', '.join(sorted(allowed))}",
            **where,
        )
    if kind == "missing":
        return Diagnostic(
            "error",
            f'missing required key "{real[-1]}" in {table}',
            help=_field_help(Recipe, real),
            **where,
        )
    if len(errs) > 1 and all(e["branch"] for e in errs):
        expected = " or ".join(_describe_branch(e) for e in errs)
        return Diagnostic(
            "error", f"{'.'.join(real)} = {_show(err['input'])} is invalid: expected {expected}", **where
        )
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", err["ctx"]["expected"])
        return Diagnostic(
            "error",
            f"{'.'.join(real)} = {_show(err['input'])} is not one of: {', '.join(choices)}",
            help=did_you_mean(err["input"], choices),
            **where,
        )
    message = err["msg"].removeprefix("Value error, ")
    if kind == "value_error" or not real:
        return Diagnostic("error", message, **where)
    return Diagnostic("error", f"{'.'.join(real)} = {_show(err['input'])}: {message}", **where)


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_BRANCH_WORDS = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}


def _describe_branch(err: dict[str, Any]) -> str:
    if err["type"] == "literal_error":
        return err["ctx"]["expected"].replace("'", '"')
    return _BRANCH_WORDS.get(err["type"]) or err["msg"].lower().removeprefix("input should be ")


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete alternatives of an annotation (Optional/Union/Annotated stripped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [alt for arg in typing.get_args(annotation) for alt in _unwrap(arg)]
    return [annotation]


def _child(annotation: Any, segment: str | int) -> tuple[Any | None, bool]:
    """Follow one loc segment. Returns (child annotation, whether the segment was a real key)."""
    for alt in _unwrap(annotation):
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            for name, field in alt.model_fields.items():
                if segment in (name, field.alias):
                    return field.annotation, True
        origin = typing.get_origin(alt)
        if origin in (list, tuple) and isinstance(segment, int):
            args = typing.get_args(alt)
            return (args[0] if args else Any), True
        if origin is dict and isinstance(segment, str):
            return typing.get_args(alt)[1], True
    return None, False


def _real_path(model: type[BaseModel], loc: tuple[str | int, ...]) -> tuple[tuple[str, ...], str | None]:
    """Strip pydantic's union-branch tags (e.g. 'int', "literal['auto']") from an error location."""
    real: list[str] = []
    branch = None
    annotation: Any = model
    for segment in loc:
        child, is_key = _child(annotation, segment)
        if is_key:
            real.append(str(segment))
            annotation = child
        else:
            branch = str(segment)
            # a union branch named after a model: continue inside it
            for alt in _unwrap(annotation):
                if getattr(alt, "__name__", None) == segment:
                    annotation = alt
    return tuple(real), branch


def _model_at(model: type[BaseModel], path: tuple[str, ...]) -> list[type[BaseModel]]:
    annotation: Any = model
    for segment in path:
        key: str | int = int(segment) if segment.isdigit() else segment
        annotation, _ = _child(annotation, key)
        if annotation is None:
            return []
    return [a for a in _unwrap(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]


def _allowed_keys(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    return [f.alias or n for m in _model_at(model, path) for n, f in m.model_fields.items()]


def _field_help(model: type[BaseModel], path: tuple[str, ...]) -> str | None:
    for parent in _model_at(model, path[:-1]):
        for name, field in parent.model_fields.items():
            if path[-1] in (name, field.alias) and field.description:
                return f"{path[-1]}: {field.description}"
    return f'add {path[-1]} = ... to {"[" + ".".join(path[:-1]) + "]" if len(path) > 1 else "the top level"}'
