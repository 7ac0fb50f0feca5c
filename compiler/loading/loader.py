"""Read a recipe file (TOML or JSON) into a validated, frozen `Recipe`.

Every problem is collected and reported at once, each with file, line, column and key path.
"""

from __future__ import annotations

import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ValidationError

from compiler.diagnostics import Diagnostic, RecipeError, did_you_mean
from compiler.loading.overrides import Override, apply_overrides
from compiler.loading.recipe import Recipe
from compiler.loading.source_map import SourceMap, json_source_map, toml_source_map


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    text: str
    source_map: SourceMap
    overrides: dict[str, Override] = field(default_factory=dict)  # dotted key -> the --set that set it

    def where(self, key: tuple[str | int, ...]) -> dict[str, Any]:
        """Keyword arguments locating `key` for a Diagnostic."""
        return _where(display_path(self.path), self.source_map, self.overrides, tuple(str(k) for k in key))


def _where(file: str, smap: SourceMap, overrides: dict[str, Override], key: tuple[str, ...]) -> dict[str, Any]:
    dotted = ".".join(key)
    for landed, override in overrides.items():
        if dotted == landed or dotted.startswith(landed + "."):
            return {"file": "command line", "line": None, "column": None, "key": dotted or None,
                    "source_line": f"--set {override.text}"}
    pos, _ = smap.locate(key)
    line, column = pos if pos else (None, None)
    return {
        "file": file,
        "line": line,
        "column": column,
        "key": dotted or None,
        "source_line": smap.line_text(line) if line else None,
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
        text = path.read_bytes().decode("utf-8-sig")  # a byte order mark from some editors is fine
    except OSError as exc:
        raise RecipeError.single(f"cannot read {shown}: {exc.strerror}", file=shown) from None
    except UnicodeDecodeError as exc:
        raise RecipeError.single(f"{shown} is not UTF-8 (byte {exc.start})", file=shown,
                                 help="save the recipe as UTF-8") from None
    lines = text.splitlines()

    def quote(line: int | None) -> str | None:
        return lines[line - 1] if line and line <= len(lines) else None

    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except RecursionError:
            raise RecipeError.single(f"{shown}: values nested too deeply to be a recipe", file=shown) from None
        except tomllib.TOMLDecodeError as exc:
            line, col = _toml_error_position(str(exc))
            reason = re.sub(r" \(at line \d+, column \d+\)", "", str(exc))
            reason, col = _plain_toml_error(reason, quote(line) or "", col)
            raise RecipeError.single(
                f"invalid TOML: {reason}", file=shown, line=line, column=col, source_line=quote(line)
            ) from None
        return data, text, toml_source_map(text)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except RecursionError:
            raise RecipeError.single(f"{shown}: values nested too deeply to be a recipe", file=shown) from None
        except ValueError as exc:
            if not isinstance(exc, json.JSONDecodeError):  # e.g. an integer literal of thousands of digits
                raise RecipeError.single(f"invalid JSON: {exc}", file=shown) from None
            message, line, column = _plain_json_error(exc)
            raise RecipeError.single(
                f"invalid JSON: {message}", file=shown, line=line, column=column, source_line=quote(line)
            ) from None
        if not isinstance(data, dict):
            raise RecipeError.single(
                f"the top level of {shown} must be an object, found {_json_kind(data)}",
                file=shown, line=1, column=1, source_line=quote(1),
            )
        smap = json_source_map(text)
        if smap.duplicates:
            key, (line, column) = smap.duplicates[0]
            raise RecipeError.single(
                f'invalid JSON: key "{key[-1]}" is defined twice', file=shown, line=line, column=column,
                source_line=quote(line), help="remove one of them",
            )
        return data, text, smap
    raise RecipeError.single(
        f"{shown}: unsupported recipe format \"{suffix or '(no extension)'}\"",
        help="write the recipe as .toml or .json",
    )


MAX_NESTING = 32  # no recipe needs more; deeper input only exercises recursion limits


def _check_plain(data: Any, shown: str, smap) -> None:
    """Refuse what no recipe contains and later stages would choke on: deep nesting, and text that
    is not valid Unicode (a lone surrogate escape in JSON)."""
    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    while stack:
        value, key, depth = stack.pop()
        where = ".".join(str(k) for k in key) or "(top level)"
        if depth > MAX_NESTING:
            raise RecipeError.single(f"{where}: values nested deeper than {MAX_NESTING} levels", file=shown)
        if isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, where, shown)
                stack.append((v, key + (k,), depth + 1))
        elif isinstance(value, list):
            stack.extend((v, key + (i,), depth + 1) for i, v in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, where, shown)


def _check_text(text: str, where: str, shown: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RecipeError.single(f"{where}: text is not valid Unicode (a lone surrogate such as \\ud800)",
                                 file=shown, help="remove the escape or pair it with its other half") from None


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true or false"
    if value is None:
        return "null"
    return "a number"


def _plain_toml_error(reason: str, line_text: str, column: int | None) -> tuple[str, int | None]:
    """tomllib's wording, made to name what the user wrote."""
    if reason == "Cannot overwrite a value":
        m = re.match(r"\s*([^=\s]+)\s*=", line_text)
        if m:
            return f'key "{m.group(1)}" is defined twice', m.start(1) + 1
    if m := re.match(r"Cannot declare \((.*)\) twice", reason):
        names = re.findall(r"'([^']*)'", m.group(1))
        return f"table [{'.'.join(names)}] is declared twice", line_text.find("[") + 2
    if reason == "Illegal character '\\n'" or reason.startswith("Illegal character '\\n'"):
        for quote in ('"', "'"):
            if line_text.count(quote) % 2 == 1:
                return "unterminated string", line_text.rfind(quote) + 1
    return reason, column


def _plain_json_error(exc: json.JSONDecodeError) -> tuple[str, int, int]:
    """A trailing comma is the commonest JSON mistake; say so, at the comma."""
    before = exc.doc[: exc.pos].rstrip()
    if before.endswith(",") and exc.msg in ("Expecting property name enclosed in double quotes", "Expecting value"):
        comma = len(before) - 1
        line = exc.doc.count("\n", 0, comma) + 1
        column = comma - (exc.doc.rfind("\n", 0, comma) + 1) + 1
        closing = exc.doc[exc.pos : exc.pos + 1]
        where = "array" if closing == "]" else "object"
        return f"Illegal trailing comma before end of {where}", line, column
    return exc.msg, exc.lineno, exc.colno


def _toml_error_position(message: str) -> tuple[int | None, int | None]:
    m = re.search(r"at line (\d+), column (\d+)", message)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def load_recipe(path: Path, overrides: Sequence[Override] = ()) -> LoadedRecipe:
    """Parse, apply `--set` overrides, and validate; raise RecipeError with every schema problem."""
    path = Path(path)
    data, text, smap = parse_document(path)
    _check_plain(data, display_path(path), smap)
    if isinstance(data.get("$schema"), str):
        data = {k: v for k, v in data.items() if k != "$schema"}  # an editor hint, not a setting
    data, landed = apply_overrides(data, list(overrides))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_diagnostics_from(exc, display_path(path), smap, landed)) from None
    return LoadedRecipe(recipe=recipe, path=path, text=text, source_map=smap, overrides=landed)


# ---------------------------------------------------------------------------------------------
# pydantic errors -> diagnostics


def _diagnostics_from(
    exc: ValidationError, file: str, smap: SourceMap, overrides: dict[str, Override]
) -> list[Diagnostic]:
    grouped: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for err in exc.errors():
        loc = err["loc"]
        if err["type"] == "extra_forbidden":  # the last segment is the unknown key itself
            real, branch, parent = _real_path(Recipe, loc[:-1])
            real += (str(loc[-1]),)
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            real, branch, parent = _real_path(Recipe, loc)  # parent: the tagged union itself
            real += (err["ctx"]["discriminator"].strip("'"),)
        else:
            real, branch, parent = _real_path(Recipe, loc[:-1]) if loc else ((), None, Recipe)
            if loc:
                tail, tail_branch, _ = _real_path(parent, loc[-1:])
                real, branch = real + tail, branch or tail_branch
        err = {**err, "branch": branch, "parent": parent}
        grouped.setdefault(real, []).append(err)
    out = []
    for real, errs in grouped.items():
        out.append(_diagnostic(real, errs, _where(file, smap, overrides, real)))
    out.sort(key=lambda d: (d.line or 0, d.column or 0, d.message))
    return out


def _diagnostic(real: tuple[str, ...], errs: list[dict[str, Any]], where: dict[str, Any]) -> Diagnostic:
    table = f"[{'.'.join(real[:-1])}]" if len(real) > 1 else "the top level"
    err = errs[0]
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _keys_of(err["parent"])
        return Diagnostic(
            "error",
            f'unknown key "{real[-1]}" in {table}',
            help=did_you_mean(real[-1], allowed) or f"allowed keys: {', '.join(sorted(allowed))}",
            **where,
        )
    if kind == "union_tag_not_found":
        choices = re.findall(r"'([^']*)'", _expected_tags(err["parent"], real[-1]))
        return Diagnostic(
            "error",
            f'missing required key "{real[-1]}" in {table}',
            help=f"{real[-1]} is one of: {', '.join(choices)}",
            **where,
        )
    if kind == "union_tag_invalid":
        choices = re.findall(r"'([^']*)'", err["ctx"]["expected_tags"])
        return Diagnostic(
            "error",
            f"{'.'.join(real)} = {_show(err['ctx']['tag'])} is not one of: {', '.join(choices)}",
            help=did_you_mean(err["ctx"]["tag"], choices),
            **where,
        )
    if kind == "missing":
        return Diagnostic(
            "error",
            f'missing required key "{real[-1]}" in {table}',
            help=_field_help(err["parent"], real[-1], real[:-1]),
            **where,
        )
    if len(errs) > 1 and all(e["branch"] for e in errs):
        expected = " or ".join(dict.fromkeys(_describe_branch(e) for e in errs))
        return Diagnostic(
            "error", f"{'.'.join(real)} = {_show(errs[0]['input'])} is invalid: expected {expected}", **where
        )
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'|(\d+)", err["ctx"]["expected"])
        choices = [a or b for a, b in choices]
        value = err["input"]
        if isinstance(value, str) and value in choices and any(b for _, b in re.findall(r"'([^']*)'|(\d+)", err["ctx"]["expected"])):
            hint = f"write the number without quotes: {real[-1]} = {value}"
        else:
            hint = did_you_mean(value, choices)
        return Diagnostic(
            "error",
            f"{'.'.join(real)} = {_show(value)} is not one of: {', '.join(choices)}",
            help=hint,
            **where,
        )
    message = err["msg"].removeprefix("Value error, ")
    if kind == "value_error" or not real:
        return Diagnostic("error", message, **where)
    return Diagnostic("error", f"{'.'.join(real)} = {_show(err['input'])}: {_plain(message)}", **where)


def _plain(message: str) -> str:
    """Pydantic's wording, lightly edited: no capital "Input should be", patterns explained."""
    message = message.replace("Input should be", "should be")
    if message.startswith("String should match pattern"):
        return "should be lowercase letters, digits, '.', '_' or '-'"
    return message


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
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


def _models(annotation: Any) -> list[type[BaseModel]]:
    return [a for a in _unwrap(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]


_TAGS = ("init", "kind")  # discriminator fields of the tagged sections


def _tag_of(model: type[BaseModel]) -> str | None:
    for name in _TAGS:
        info = model.model_fields.get(name)
        if info is not None and typing.get_origin(info.annotation) is typing.Literal and info.is_required():
            return typing.get_args(info.annotation)[0]
    return None


def _child(annotation: Any, segment: str | int) -> tuple[Any | None, bool]:
    """Follow one loc segment. Returns (child annotation, whether the segment was a real key)."""
    for alt in _unwrap(annotation):
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            for name, info in alt.model_fields.items():
                if segment in (name, info.alias):
                    if info.metadata:
                        return typing.Annotated[(info.annotation, *info.metadata)], True
                    return info.annotation, True
        origin = typing.get_origin(alt)
        if origin in (list, tuple) and isinstance(segment, int):
            args = typing.get_args(alt)
            return (args[0] if args else Any), True
        if origin is dict and isinstance(segment, str):
            return typing.get_args(alt)[1], True
    return None, False


def _real_path(model: Any, loc: tuple[str | int, ...]) -> tuple[tuple[str, ...], str | None, Any]:
    """Strip pydantic's union-branch tags (e.g. 'int', 'lora') from an error location.

    Returns the path as the user wrote it, the last branch tag seen, and the annotation reached
    (narrowed to the tagged alternative, so "unknown key" lists that alternative's keys)."""
    real: list[str] = []
    branch = None
    annotation: Any = model
    for segment in loc:
        child, is_key = _child(annotation, segment)
        if is_key:
            real.append(str(segment))
            annotation = child
            continue
        branch = str(segment)
        for alt in _models(annotation):
            if segment in (alt.__name__, _tag_of(alt)):
                annotation = alt
                break
    return tuple(real), branch, annotation


def _keys_of(annotation: Any) -> list[str]:
    return [f.alias or n for m in _models(annotation) for n, f in m.model_fields.items()]


def _expected_tags(annotation: Any, tag_field: str) -> str:
    tags = [_tag_of(m) for m in _models(annotation)]
    return ", ".join(f"'{t}'" for t in tags if t)


def _field_help(parent: Any, key: str, table: tuple[str, ...]) -> str:
    for model in _models(parent):
        for name, info in model.model_fields.items():
            if key in (name, info.alias) and info.description:
                return f"{key}: {' '.join(info.description.split())}"
    return f'add {key} = ... to {"[" + ".".join(table) + "]" if table else "the top level"}'
