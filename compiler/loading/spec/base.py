"""What every recipe section shares: strict, frozen, documented by its field docstrings."""

from __future__ import annotations

import ast
import inspect
import re
import sys
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Auto = Literal["auto"]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1.0)]
Probability = Annotated[float, Field(ge=0, lt=1.0)]

# Names that end up as directory names, dataset keys and stage references.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class Section(BaseModel):
    """Unknown keys are errors (never silently dropped); values cannot change after validation.

    Each field's docstring becomes its description in the exported JSON Schema, which editors
    show on hover, so they are written for the person editing a recipe.
    """

    # defer_build: only the top-level Recipe builds a validator, on first use, instead of every
    # section building its own at import (keeps `recipe validate` fast).
    # strict: "2" is not silently read as 2, nor "yes" as true; a recipe says what it means.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, defer_build=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        describe_fields(cls)


@cache
def _module_field_docs(module_name: str) -> dict[str, dict[str, str]]:
    """{class name: {field: docstring}} for one module, from a single parse of its source.

    pydantic's `use_attribute_docstrings` does the same per class (re-reading the source each
    time); doing it once per module keeps the import of the recipe models cheap."""
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return {}
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for field, doc in zip(node.body, node.body[1:]):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)
            ):
                docs.setdefault(node.name, {})[field.target.id] = inspect.cleandoc(doc.value.value)
    return docs


def describe_fields(cls: type[BaseModel]) -> None:
    """Give each field without a description the docstring written under it (here or in a base)."""
    for name, info in cls.model_fields.items():
        if info.description:
            continue
        for klass in cls.__mro__:
            doc = _module_field_docs(klass.__module__).get(klass.__qualname__, {}).get(name)
            if doc:
                info.description = doc
                break


def exactly_one(section: BaseModel, names: tuple[str, ...], where: str) -> None:
    """Raise ValueError unless exactly one of `names` is set on `section`."""
    given = [n for n in names if getattr(section, n) is not None]
    if len(given) != 1:
        options = " or ".join(f'{n} = "..."' for n in names)
        found = f" (found {', '.join(given)})" if given else ""
        raise ValueError(f"give exactly one of {options} in {where}{found}")
