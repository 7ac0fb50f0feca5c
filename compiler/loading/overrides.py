"""`--set key.path=value`: change one recipe value from the command line, typed and validated.

Values are parsed as TOML values (`1e-4` is a float, `true` a boolean, `[1, 2]` a list,
`"text"` a string); a bare word that is not valid TOML is taken as a string, so
`--set hardware.precision=bf16` works without quotes. Stages may be addressed by name
(`stages.sft.learning_rate`) or by position (`stages.0.learning_rate`).

The bare word `none` removes the key, as if the file had never set it, so an override can switch
a choice: `--set train.epochs=none --set train.max_steps=30`. (`--set key='"none"'` sets the
text "none"; for the keys whose choices include "none", removing gives that default anyway.)
"""

from __future__ import annotations

import copy
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from compiler.diagnostics import RecipeError

_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_.-]+)*$")


class _Remove:
    """The value of `--set key=none`: take the key out of the recipe."""

    def __repr__(self) -> str:
        return "none"


REMOVE = _Remove()


@dataclass(frozen=True)
class Override:
    text: str  # as typed, for messages and the plan
    path: tuple[str, ...]
    value: Any


def parse_override(text: str) -> Override:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not _KEY.match(key):
        raise RecipeError.single(
            f"--set \"{text}\": expected KEY=VALUE with a dotted key, e.g. --set train.learning_rate=1e-4"
        )
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = REMOVE if raw == "none" else raw  # a bare word: take it as text
    return Override(text=f"{key}={raw}", path=tuple(key.split(".")), value=value)


def apply_overrides(data: dict[str, Any], overrides: list[Override]) -> tuple[dict[str, Any], dict[str, Override]]:
    """A copy of the parsed recipe with the overrides applied, and the key path (as dotted
    string, list positions as numbers) each override landed on."""
    data = copy.deepcopy(data)
    landed: dict[str, Override] = {}
    for override in overrides:
        node: Any = data
        real: list[str] = []
        for i, segment in enumerate(override.path):
            last = i == len(override.path) - 1
            if isinstance(node, list):
                index = _list_index(node, segment, override)
                real.append(str(index))
                if last and override.value is REMOVE:
                    raise RecipeError.single(f"--set {override.text}: none removes a key, not a list element")
                if last:
                    node[index] = override.value
                else:
                    node = node[index]
                continue
            if not isinstance(node, dict):
                raise RecipeError.single(
                    f"--set {override.text}: {'.'.join(override.path[:i])} is a value, not a table"
                )
            real.append(segment)
            if last and override.value is REMOVE:
                node.pop(segment, None)
            elif last:
                node[segment] = override.value
            elif override.value is REMOVE and segment not in node:
                break  # nothing there to remove
            else:
                node = node.setdefault(segment, {})
        landed[".".join(real)] = override
    return data, landed


def _list_index(items: list[Any], segment: str, override: Override) -> int:
    if segment.isdigit():
        if int(segment) < len(items):
            return int(segment)
        raise RecipeError.single(f"--set {override.text}: there is no element {segment} (the list has {len(items)})")
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if segment in names:
        return names.index(segment)
    raise RecipeError.single(
        f"--set {override.text}: no element named \"{segment}\"",
        help=f"names: {', '.join(str(n) for n in names)}" if names else None,
    )
