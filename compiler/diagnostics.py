"""Diagnostics: what went wrong, where, and how to fix it.

Rendered like a compiler error so that a reviewer can jump to the line:

    error: unknown key "learnig_rate" in [stages.0]
      --> specs/examples/tweets.toml:14:1
       | learnig_rate = 2e-5
       = help: did you mean "learning_rate"?
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence


@dataclass(frozen=True)
class Diagnostic:
    severity: Literal["error", "warning"]
    message: str
    file: str | None = None
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    key: str | None = None  # dotted key path, e.g. "stages.0.learning_rate"
    help: str | None = None
    source_line: str | None = None

    def render(self) -> str:
        head = f"{self.severity}: {self.message}"
        lines = [head]
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}:{self.column or 1}"
            lines.append(f"  --> {where}")
        if self.source_line is not None:
            lines.append(f"   | {self.source_line.rstrip()}")
        if self.key and (self.file is None or self.key not in head):
            lines.append(f"   = key: {self.key}")
        if self.help:
            lines.append(f"   = help: {self.help}")
        return "\n".join(lines)


class RecipeError(Exception):
    """One or more error diagnostics about the user's input. The CLI renders them and exits 1."""

    def __init__(self, diagnostics: Sequence[Diagnostic]):
        self.diagnostics = tuple(diagnostics)
        super().__init__(render_all(self.diagnostics))

    @classmethod
    def single(cls, message: str, **where) -> RecipeError:
        return cls([Diagnostic("error", message, **where)])


def render_all(diagnostics: Iterable[Diagnostic]) -> str:
    diagnostics = list(diagnostics)
    errors = sum(d.severity == "error" for d in diagnostics)
    warnings = len(diagnostics) - errors
    body = "\n\n".join(d.render() for d in diagnostics)
    tally = []
    if errors:
        tally.append(f"{errors} error{'s' * (errors != 1)}")
    if warnings:
        tally.append(f"{warnings} warning{'s' * (warnings != 1)}")
    return body + (f"\n\n{', '.join(tally)}" if tally else "")


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A help line suggesting the closest choice, or None when nothing is close."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f'did you mean "{match[0]}"?' if match else None
