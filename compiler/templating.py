"""Prompt templates: jinja2 in a sandbox, with every variable required.

A template arrives in a pull request from someone you may not trust: it is rendered in
`SandboxedEnvironment` (no attribute walks to internals, no calling unsafe callables) with
`StrictUndefined` (a misspelled field is an error, not an empty string).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta, nodes
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
    # Text and field names, when the template is nothing but text and {{ field }}: rendered by
    # joining strings, which gives jinja's output exactly (str() of each value) about 30x faster.
    _parts: tuple[tuple[bool, str], ...] | None = None

    def render(self, fields: dict[str, Any]) -> str:
        if self._parts is not None:
            try:
                return "".join(str(fields[text]) if is_field else text for is_field, text in self._parts)
            except KeyError as exc:
                raise TemplateError(f"template uses an undefined value: '{exc.args[0]}' is undefined") from None
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
    return Template(source=source, variables=frozenset(meta.find_undeclared_variables(ast)), _compiled=compiled,
                    _parts=_plain_parts(ast))


def _plain_parts(ast: nodes.Template) -> tuple[tuple[bool, str], ...] | None:
    """(is_field, text) pieces of a template made only of text and bare {{ name }} outputs."""
    if not ast.body:
        return ()
    if len(ast.body) != 1 or not isinstance(ast.body[0], nodes.Output):
        return None
    parts = []
    for node in ast.body[0].nodes:
        if isinstance(node, nodes.TemplateData):
            parts.append((False, node.data))
        elif isinstance(node, nodes.Name) and node.ctx == "load":
            parts.append((True, node.name))
        else:
            return None
    return tuple(parts)
