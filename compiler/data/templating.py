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


# One rendered example larger than this is an output bomb, not a prompt.
MAX_REPEAT_CHARS = 1_000_000


class _BoundedSandbox(SandboxedEnvironment):
    """The sandbox, plus a bound on `*` and `**`: `'x' * 10**9` would allocate a gigabyte before
    any size check could look at the output, and `9 ** 9 ** 9` would spin on one big integer."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT_CHARS:
                    raise jinja2.exceptions.SecurityError(
                        f"repetition to {len(seq) * n:,} items exceeds the template limit of {MAX_REPEAT_CHARS:,}")
        if operator == "**" and isinstance(right, int) and isinstance(left, int) \
                and abs(right) * max(1, abs(left)).bit_length() > 64 * 1024:
            raise jinja2.exceptions.SecurityError("power too large for a template")
        return super().call_binop(context, operator, left, right)


def _environment() -> SandboxedEnvironment:
    return _BoundedSandbox(
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
        except TypeError as exc:  # {% include %}, {% import %}, {% extends %}: templates load nothing
            if "no loader" in str(exc):
                raise TemplateError("templates cannot include, import or extend other templates") from None
            raise TemplateError(f"template failed to render: {exc}") from None
        except (OverflowError, MemoryError, RecursionError) as exc:  # range() past the sandbox's MAX_RANGE, ...
            raise TemplateError(f"template exceeds the sandbox's limits: {exc}") from None


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
