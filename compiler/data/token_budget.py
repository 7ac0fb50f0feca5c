"""The token budget: measure templated lengths, choose the context length, truncate fields.

The compiler owns the budget so that training and evaluation use the same numbers. Only fields
the recipe marks truncatable are ever shortened; the completion (the label) never is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from compiler.data.read import Row
from compiler.data.templating import Template, TemplateError


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
    p90: int
    p95: int
    p99: int

    @classmethod
    def of(cls, lengths: Sequence[int]) -> LengthStats:
        ordered = sorted(lengths)
        if not ordered:
            return cls(count=0, min=0, max=0, mean=0.0, p50=0, p90=0, p95=0, p99=0)
        return cls(
            count=len(ordered),
            min=ordered[0],
            max=ordered[-1],
            mean=round(sum(ordered) / len(ordered), 2),
            p50=nearest_rank(ordered, 0.50),
            p90=nearest_rank(ordered, 0.90),
            p95=nearest_rank(ordered, 0.95),
            p99=nearest_rank(ordered, 0.99),
        )


def nearest_rank(ordered: Sequence[int], q: float) -> int:
    """The smallest value with at least a fraction `q` of the data at or below it."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def histogram(lengths: Sequence[int]) -> list[dict[str, int]]:
    """Counts in doubling bins [0, 8), [8, 16), [16, 32), ... up to the longest length."""
    if not lengths:
        return []
    edges = [8]
    while edges[-1] <= max(lengths):
        edges.append(edges[-1] * 2)
    counts = [0] * len(edges)
    for n in lengths:
        counts[next(i for i, edge in enumerate(edges) if n < edge)] += 1
    return [{"below": edge, "count": c} for edge, c in zip(edges, counts)]


@dataclass(frozen=True)
class Example:
    """A row rendered and tokenized within the budget."""

    line: int
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    fields: dict[str, Any]
    tokens_removed: int = 0
    label_tokens_removed: int = 0
    removed_by_field: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenBudget:
    """What the compiler chose and measured; every value appears in the plan with its reason."""

    max_total_tokens: int
    reason: str
    prompt: LengthStats  # before truncation
    completion: LengthStats
    total: LengthStats
    fields: dict[str, LengthStats]  # each prompt field's own length, before truncation
    histogram: list[dict[str, int]]  # of totals before truncation
    total_after: LengthStats  # of the examples kept, after truncation
    fixed_tokens_max: int  # longest fixed part (truncatable fields emptied) among rows over the budget
    n_truncated: int
    tokens_removed: int
    removed_by_field: dict[str, int]
    truncated_fields: tuple[str, ...]
    n_label_truncated: int
    n_dropped: int
    overflow_lines: tuple[int, ...]
    max_completion_tokens: int


@dataclass
class _Measured:
    row: Row
    prompt_ids: list[int]
    completion_ids: list[int]
    fixed_prompt_tokens: int = 0
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def fixed_tokens(self) -> int:
        return self.fixed_prompt_tokens + len(self.completion_ids)


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
    n_positions_cap: int | None  # the model's context length, when fixed
    truncatable: tuple[str, ...]  # prompt fields that may be cut, in the order they are cut
    eos_ids: tuple[int, ...]  # appended to every completion (empty when add_eos is off)
    overflow: str = "fail"  # rows that cannot fit without losing supervised tokens: fail, drop or truncate
    overflow_allowed: int = 0  # how many such rows the recipe accepts


class TemplateRowError(Exception):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


def render_rows(rows: Sequence[Row], template: Template) -> list[str]:
    out = []
    for row in rows:
        try:
            out.append(template.render(row.fields))
        except TemplateError as exc:
            raise TemplateRowError(row.line, str(exc)) from None
    return out


def plan_budget(
    rows: Sequence[Row],
    prompt: Template,
    completion: Template,
    encoder: Encoder,
    request: BudgetRequest,
) -> tuple[TokenBudget, list[Example | None]]:
    """Measure every row, choose the total budget, and fit rows that exceed it.

    Returns one entry per row, in order; None for a row the overflow policy dropped."""
    measured = _measure(rows, prompt, completion, encoder, request)
    totals = sorted(m.total for m in measured)
    # A row's fixed part is at most its total, so only rows longer than the smallest budget the
    # data could get need theirs measured (the chosen budget is never below this one).
    floor = choose_max_total(totals, request)[0]
    long_rows = [m for m in measured if m.total > floor]
    _measure_fixed(long_rows, prompt, encoder, request)
    fixed_max = max((m.fixed_tokens for m in long_rows), default=0)
    budget, reason = choose_max_total(totals, request, fixed_max=fixed_max)

    overflow = [m for m in measured if m.fixed_tokens > budget]
    if overflow and (request.overflow == "fail" or len(overflow) > request.overflow_allowed):
        lines = [m.row.line for m in overflow]
        fields = ", ".join(request.truncatable) or "no field"
        allowed = "" if request.overflow == "fail" else f" (tokens.overflow_allowed = {request.overflow_allowed})"
        raise BudgetError(
            f"{len(overflow)} rows would lose supervised tokens: they need more than {budget} tokens even with "
            f"{fields} emptied (longest: {fixed_max}){allowed}",
            lines,
        )
    examples: list[Example | None] = []
    for m in measured:
        if m.fixed_tokens > budget and request.overflow == "drop":
            examples.append(None)
        else:
            examples.append(_fit(m, budget, prompt, encoder, request))
    kept = [e for e in examples if e is not None]
    removed_by_field = {f: 0 for f in request.truncatable}
    for e in kept:
        for f, n in e.removed_by_field.items():
            removed_by_field[f] += n
    summary = TokenBudget(
        max_total_tokens=budget,
        reason=reason,
        prompt=LengthStats.of([len(m.prompt_ids) for m in measured]),
        completion=LengthStats.of([len(m.completion_ids) for m in measured]),
        total=LengthStats.of(totals),
        fields=_field_lengths(rows, prompt, encoder),
        histogram=histogram(totals),
        total_after=LengthStats.of([len(e.prompt_ids) + len(e.completion_ids) for e in kept]),
        fixed_tokens_max=fixed_max,
        n_truncated=sum(1 for e in kept if e.tokens_removed),
        tokens_removed=sum(e.tokens_removed for e in kept),
        removed_by_field=removed_by_field,
        truncated_fields=request.truncatable,
        n_label_truncated=sum(1 for e in kept if e.label_tokens_removed),
        n_dropped=len(examples) - len(kept),
        overflow_lines=tuple(m.row.line for m in overflow),
        max_completion_tokens=max(len(m.completion_ids) for m in measured),
    )
    return summary, examples


def choose_max_total(totals: Sequence[int], request: BudgetRequest, *, fixed_max: int = 0,
                     unit: str = "templated example") -> tuple[int, str]:
    """The context length (tokens.max_total) and why: as set, or the length that covers
    `request.coverage` of the sorted `totals` rounded up, raised so the longest fixed part
    (`fixed_max`) fits, and never over the model's context length. Every data path chooses here;
    `unit` names what was measured in the reason ("templated example", "rendered conversation")."""
    if request.max_total_tokens is not None:
        budget = request.max_total_tokens
        reason = f"set in the recipe (tokens.max_total = {budget})"
    else:
        at_coverage = nearest_rank(totals, request.coverage)
        budget = _round_up(at_coverage, request.round_to)
        which = f"the longest {unit} is" if request.coverage == 1.0 else (
            f"{request.coverage:.0%} of {unit}s are at most")
        reason = f"{which} {at_coverage} tokens; rounded up to a multiple of {request.round_to}"
        if fixed_max > budget:
            budget = _round_up(fixed_max, request.round_to)
            reason += (f"; raised to {budget} so the longest fixed part ({fixed_max} tokens) "
                       "fits without cutting the completion")
    cap = request.n_positions_cap
    if cap is not None and budget > cap:
        if request.max_total_tokens is not None:
            raise BudgetError(f"tokens.max_total = {budget} exceeds the model's context length {cap}", [])
        budget = cap
        reason += f"; capped at the model's context length {cap}"
    return budget, reason


def token_profile(budget: int, reason: str, stats: dict, fields: dict, hist: list, after: dict, n_train: int,
                  n_heldout: int, *, truncated: int, tokens_removed: int, removed_by_field: dict[str, int],
                  truncatable: list[str], label_truncated: int, dropped: int, fixed_max: int | None) -> dict[str, Any]:
    """The plan's token profile of one data set; key names are read by other tools, keep them."""
    n = max(1, stats["total"]["count"])
    return {
        "max_total_tokens": budget,
        "reason": reason,
        "measured": True,
        "before_truncation": stats,
        "fields": fields,
        "histogram": hist,
        "after_truncation": {"total": after},
        "fixed_tokens_max": fixed_max,
        "train_examples": n_train,
        "eval_examples": n_heldout,
        "truncated_examples": truncated,
        "truncated_fraction": round(truncated / n, 4),
        "tokens_removed": tokens_removed,
        "removed_by_field": removed_by_field,
        "truncatable_fields": truncatable,
        "label_truncated_examples": label_truncated,
        "dropped_examples": dropped,
    }


def _field_lengths(rows: Sequence[Row], prompt: Template, encoder: Encoder) -> dict[str, LengthStats]:
    out = {}
    for name in sorted(prompt.variables):
        values = [str(r.fields[name]) for r in rows if name in r.fields]
        if values:
            out[name] = LengthStats.of([len(ids) for ids in encoder.encode_batch(values)])
    return out


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _measure(
    rows: Sequence[Row], prompt: Template, completion: Template, encoder: Encoder, request: BudgetRequest
) -> list[_Measured]:
    prompt_ids = encoder.encode_batch(render_rows(rows, prompt))
    completion_ids = encoder.encode_batch(render_rows(rows, completion))
    out = []
    for row, p, c in zip(rows, prompt_ids, completion_ids):
        c = c + list(request.eos_ids)
        out.append(_Measured(row, p, c, fixed_prompt_tokens=len(p), fields=row.fields))
    return out


def _measure_fixed(measured: list[_Measured], prompt: Template, encoder: Encoder, request: BudgetRequest) -> None:
    """The fixed part of each row: its prompt with every truncatable field emptied.

    Only rows longer than `limit` can overflow, so only they are re-rendered and re-tokenized
    (a row's fixed part is never longer than the row)."""
    if not request.truncatable or not measured:
        return
    emptied = [Row(m.row.line, dict(m.row.fields, **{f: "" for f in request.truncatable})) for m in measured]
    for m, ids in zip(measured, encoder.encode_batch(render_rows(emptied, prompt))):
        m.fixed_prompt_tokens = len(ids)


def _fit(m: _Measured, budget: int, prompt: Template, encoder: Encoder, request: BudgetRequest) -> Example:
    """Cut truncatable fields, in the declared order, from their end, until the example fits.

    The field's text is cut at a token boundary and the whole prompt re-tokenized, so the result
    is exactly what tokenizing the shortened text at inference time gives. Only with
    tokens.overflow = "truncate" does a row that still does not fit lose completion tokens.
    """
    if m.total <= budget:
        return Example(m.row.line, tuple(m.prompt_ids), tuple(m.completion_ids), m.fields)
    fields = dict(m.fields)
    prompt_ids = m.prompt_ids
    completion_ids = m.completion_ids
    room = max(0, budget - len(completion_ids))
    removed: dict[str, int] = {}
    for name in request.truncatable:
        if len(prompt_ids) <= room:
            break
        value_ids = encoder.encode_batch([str(fields[name])])[0]
        keep = max(0, len(value_ids) - (len(prompt_ids) - room))
        while True:
            fields[name] = encoder.decode(value_ids[:keep]).rstrip("\ufffd")
            prompt_ids = encoder.encode_batch([prompt.render(fields)])[0]
            if len(prompt_ids) <= room or keep == 0:
                break
            keep -= 1
        removed[name] = len(value_ids) - keep
    label_removed = 0
    if len(prompt_ids) + len(completion_ids) > budget:  # only reachable with overflow = "truncate"
        keep = max(0, budget - len(prompt_ids))
        label_removed = len(completion_ids) - keep
        completion_ids = completion_ids[:keep]
    removed_total = m.total - len(prompt_ids) - len(completion_ids) - label_removed
    return Example(m.row.line, tuple(prompt_ids), tuple(completion_ids), fields, tokens_removed=removed_total,
                   label_tokens_removed=label_removed, removed_by_field=removed)
