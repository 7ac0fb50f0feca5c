"""Prompt templates: jinja2 in a sandbox, with every variable required.

A template arrives in a pull request from someone you may not trust: it is rendered in
`SandboxedEnvironment` (no attribute walks to internals, no calling unsafe callables) with
`StrictUndefined` (a misspelled field is an error, not an empty string).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment


def _environment() -> SandboxedEnvironment:
    return SandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=False,
    )


class TemplateError(Exception):
    """A template that does not parse or does not render; `lineno` is within the template."""

    def __init__(self, message: str, lineno: int | None = None):
        super().__init__(message)
        self.lineno = lineno


@dataclass(frozen=True)
class Template:
    """A compiled template and the data fields it reads."""

    source: str
    variables: frozenset[str]
    _compiled: jinja2.Template

    def render(self, fields: dict[str, Any]) -> str:
        try:
            return self._compiled.render(**fields)
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"template tried an unsafe operation: {exc}") from None
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"template uses an undefined value: {exc.message}") from None
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template failed to render: {exc}") from None


def compile_template(source: str) -> Template:
    """Parse `source`; raise TemplateError with the template line on a syntax error."""
    env = _environment()
    try:
        ast = env.parse(source)
        compiled = env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error: {exc.message}", exc.lineno) from None
    return Template(source=source, variables=frozenset(meta.find_undeclared_variables(ast)), _compiled=compiled)
