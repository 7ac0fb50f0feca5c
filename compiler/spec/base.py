"""What every recipe section shares: strict, frozen, documented by its field docstrings."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Auto = Literal["auto"]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]

# Names that end up as directory names, dataset keys and stage references.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class Section(BaseModel):
    """Unknown keys are errors (never silently dropped); values cannot change after validation.

    Each field's docstring becomes its description in the exported JSON Schema, which editors
    show on hover, so they are written for the person editing a recipe.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def exactly_one(section: BaseModel, names: tuple[str, ...], where: str) -> None:
    """Raise ValueError unless exactly one of `names` is set on `section`."""
    given = [n for n in names if getattr(section, n) is not None]
    if len(given) != 1:
        options = " or ".join(f'{n} = "..."' for n in names)
        found = f" (found {', '.join(given)})" if given else ""
        raise ValueError(f"give exactly one of {options} in {where}{found}")
