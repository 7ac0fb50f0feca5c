"""The token budget: measure templated lengths, choose the context length, truncate fields.

The compiler owns the budget so that training and evaluation use the same numbers. Only fields
the recipe marks truncatable are ever shortened; the completion (the label) never is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from compiler.data import Row
from compiler.templating import Template, TemplateError


class Encoder(Protocol):
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class LengthStats:
    """Distribution of token lengths (nearest-rank percentiles)."""

    count: int
    min: int
    max: int
    mean: float
    p50: int
    p95: int
    p99: int

    @classmethod
    def of(cls, lengths: Sequence[int]) -> LengthStats:
        ordered = sorted(lengths)
        return cls(
            count=len(ordered),
            min=ordered[0],
            max=ordered[-1],
            mean=round(sum(ordered) / len(ordered), 2),
            p50=nearest_rank(ordered, 0.50),
            p95=nearest_rank(ordered, 0.95),
            p99=nearest_rank(ordered, 0.99),
        )


def nearest_rank(ordered: Sequence[int], q: float) -> int:
    """The smallest value with at least a fraction `q` of the data at or below it."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class Example:
    """A row rendered and tokenized within the budget."""

    line: int
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    fields: dict[str, Any]
    tokens_removed: int = 0


@dataclass(frozen=True)
class TokenBudget:
    """What the compiler chose and measured; every value appears in the plan with its reason."""

    max_total_tokens: int
    reason: str
    prompt: LengthStats  # before truncation
    completion: LengthStats
    total: LengthStats
    fixed_tokens_max: int  # longest rendering with every truncatable field emptied
    n_truncated: int
    tokens_removed: int
    truncated_fields: tuple[str, ...]
    max_completion_tokens: int


@dataclass
class _Measured:
    row: Row
    prompt_ids: list[int]
    completion_ids: list[int]
    fixed_tokens: int = 0
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


class BudgetError(Exception):
    """Rows that cannot fit the budget without cutting what must not be cut."""

    def __init__(self, message: str, lines: Sequence[int]):
        super().__init__(message)
        self.lines = tuple(lines)


@dataclass(frozen=True)
class BudgetRequest:
    max_total_tokens: int | None  # None: choose from the data
    coverage: float
    round_to: int
    n_positions_cap: int | None  # a fixed model context length, if the recipe sets one
    truncatable: tuple[str, ...]
    eos_ids: tuple[int, ...]  # appended to every completion (empty when add_eos is off)


class TemplateRowError(Exception):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


def render_rows(rows: Sequence[Row], prompt: Template, completion: Template) -> list[tuple[str, str]]:
    out = []
    for row in rows:
        try:
            out.append((prompt.render(row.fields), completion.render(row.fields)))
        except TemplateError as exc:
            raise TemplateRowError(row.line, str(exc)) from None
    return out


def plan_budget(
    rows: Sequence[Row],
    prompt: Template,
    completion: Template,
    encoder: Encoder,
    request: BudgetRequest,
) -> tuple[TokenBudget, list[Example]]:
    """Measure every row, choose the total budget, and truncate rows that exceed it."""
    measured = _measure(rows, prompt, completion, encoder, request)
    fixed_max = max(m.fixed_tokens for m in measured)
    totals = sorted(m.total for m in measured)

    if request.max_total_tokens is not None:
        budget = request.max_total_tokens
        reason = f"set in the recipe (budget.max_total_tokens = {budget})"
        too_long = [m.row.line for m in measured if m.fixed_tokens > budget]
        if too_long:
            raise BudgetError(
                f"{len(too_long)} rows need more than {budget} tokens even with "
                f"{', '.join(request.truncatable) or 'no field'} emptied (longest: {fixed_max})",
                too_long,
            )
    else:
        at_coverage = nearest_rank(totals, request.coverage)
        budget = _round_up(at_coverage, request.round_to)
        reason = (
            f"{request.coverage:.0%} of templated examples are at most {at_coverage} tokens; "
            f"rounded up to a multiple of {request.round_to}"
        )
        if fixed_max > budget:
            budget = _round_up(fixed_max, request.round_to)
            reason += (
                f"; raised to {budget} so the longest fixed part ({fixed_max} tokens) "
                "fits without cutting the completion"
            )
    if request.n_positions_cap is not None and budget > request.n_positions_cap:
        if request.max_total_tokens is not None or fixed_max > request.n_positions_cap:
            raise BudgetError(
                f"the budget of {budget} tokens exceeds model.n_positions = {request.n_positions_cap}",
                [],
            )
        budget = request.n_positions_cap
        reason += f"; capped at model.n_positions = {budget}"

    examples = [_fit(m, budget, prompt, encoder, request) for m in measured]
    removed = [e.tokens_removed for e in examples]
    summary = TokenBudget(
        max_total_tokens=budget,
        reason=reason,
        prompt=LengthStats.of([len(m.prompt_ids) for m in measured]),
        completion=LengthStats.of([len(m.completion_ids) for m in measured]),
        total=LengthStats.of(totals),
        fixed_tokens_max=fixed_max,
        n_truncated=sum(1 for r in removed if r),
        tokens_removed=sum(removed),
        truncated_fields=request.truncatable,
        max_completion_tokens=max(len(m.completion_ids) for m in measured),
    )
    return summary, examples


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _measure(
    rows: Sequence[Row], prompt: Template, completion: Template, encoder: Encoder, request: BudgetRequest
) -> list[_Measured]:
    rendered = render_rows(rows, prompt, completion)
    prompt_ids = encoder.encode_batch([p for p, _ in rendered])
    completion_ids = encoder.encode_batch([c for _, c in rendered])
    # The fixed part: the prompt with every truncatable field emptied.
    emptied = [dict(r.fields, **{f: "" for f in request.truncatable}) for r in rows]
    fixed_prompts = encoder.encode_batch([prompt.render(f) for f in emptied])
    out = []
    for row, p, c, fixed in zip(rows, prompt_ids, completion_ids, fixed_prompts):
        c = c + list(request.eos_ids)
        out.append(_Measured(row, p, c, fixed_tokens=len(fixed) + len(c), fields=dict(row.fields)))
    return out


def _fit(m: _Measured, budget: int, prompt: Template, encoder: Encoder, request: BudgetRequest) -> Example:
    """Cut truncatable fields (longest first, from the end) until the example fits the budget.

    The field's text is cut at a token boundary and the whole prompt re-tokenized, so the result
    is exactly what tokenizing the shortened text at inference time gives.
    """
    if m.total <= budget:
        return Example(m.row.line, tuple(m.prompt_ids), tuple(m.completion_ids), m.fields)
    fields = dict(m.fields)
    prompt_ids = m.prompt_ids
    room = budget - len(m.completion_ids)
    order = sorted(request.truncatable, key=lambda f: -len(str(fields.get(f, ""))))
    for name in order:
        value_ids = encoder.encode_batch([str(fields[name])])[0]
        keep = max(0, len(value_ids) - (len(prompt_ids) - room))
        while True:
            fields[name] = encoder.decode(value_ids[:keep]).rstrip("\ufffd")
            prompt_ids = encoder.encode_batch([prompt.render(fields)])[0]
            if len(prompt_ids) <= room or keep == 0:
                break
            keep -= 1
        if len(prompt_ids) <= room:
            break
    removed = m.total - len(prompt_ids) - len(m.completion_ids)
    return Example(m.row.line, tuple(prompt_ids), tuple(m.completion_ids), fields, tokens_removed=removed)
