"""The token budget: percentile choice, truncation of marked fields only, never the completion."""

from __future__ import annotations

from typing import Sequence

import pytest

from compiler.budget import BudgetError, BudgetRequest, LengthStats, nearest_rank, plan_budget
from compiler.data import Row
from compiler.templating import compile_template


class CharEncoder:
    """One token per character: lengths are easy to compute by hand."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[ord(c) for c in t] for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)


PROMPT = compile_template("Q: {{ text }}\nA:")  # 6 fixed characters
COMPLETION = compile_template(" {{ label }}")


def _request(**kw) -> BudgetRequest:
    base = dict(max_total_tokens=None, coverage=1.0, round_to=1, n_positions_cap=None,
                truncatable=("text",), eos_ids=())
    return BudgetRequest(**{**base, **kw})


def _rows(texts: list[str], label: str = "yes") -> list[Row]:
    return [Row(i + 1, {"text": t, "label": label}) for i, t in enumerate(texts)]


def test_nearest_rank() -> None:
    data = list(range(1, 101))
    assert nearest_rank(data, 0.99) == 99
    assert nearest_rank(data, 1.0) == 100
    assert nearest_rank(data, 0.5) == 50
    assert LengthStats.of([3, 1, 2]).mean == 2.0


def test_auto_budget_covers_all_and_truncates_nothing() -> None:
    rows = _rows(["a" * n for n in (1, 5, 10)])
    budget, examples = plan_budget(rows, PROMPT, COMPLETION, CharEncoder(), _request())
    # longest: 6 fixed + 10 text + 4 completion (" yes")
    assert budget.max_total_tokens == 20
    assert budget.n_truncated == 0
    assert all(len(e.prompt_ids) + len(e.completion_ids) <= 20 for e in examples)


def test_auto_budget_at_coverage_rounds_up_and_truncates_only_the_field() -> None:
    texts = ["a" * n for n in range(1, 101)]  # totals 11..110
    budget, examples = plan_budget(_rows(texts), PROMPT, COMPLETION, CharEncoder(),
                                   _request(coverage=0.9, round_to=8))
    assert budget.total.max == 110
    # 90th percentile total is 100 -> rounded up to 104
    assert budget.max_total_tokens == 104
    assert budget.n_truncated == 6  # totals 105..110
    assert budget.tokens_removed == sum(range(1, 7))
    for e, text in zip(examples, texts):
        assert len(e.prompt_ids) + len(e.completion_ids) <= 104
        assert CharEncoder().decode(e.completion_ids) == " yes"  # never cut
        assert text.startswith(e.fields["text"])  # a prefix of the original


def test_explicit_budget_too_small_for_fixed_part_names_rows() -> None:
    rows = _rows(["abc", "d"], label="a-very-long-label")
    with pytest.raises(BudgetError) as caught:
        plan_budget(rows, PROMPT, COMPLETION, CharEncoder(), _request(max_total_tokens=20))
    assert caught.value.lines == (1, 2)


def test_auto_budget_raised_to_fit_the_fixed_part() -> None:
    rows = _rows([""] * 99, label="a") + [Row(100, {"text": "", "label": "l" * 30})]
    budget, _ = plan_budget(rows, PROMPT, COMPLETION, CharEncoder(), _request(coverage=0.5))
    assert budget.total.p50 == 6 + 2
    assert budget.max_total_tokens == 6 + 31  # the long label's row must fit uncut
    assert "raised" in budget.reason


def test_cap_from_fixed_n_positions() -> None:
    rows = _rows(["a" * 40])
    budget, (example,) = plan_budget(rows, PROMPT, COMPLETION, CharEncoder(), _request(n_positions_cap=30))
    assert budget.max_total_tokens == 30
    assert len(example.prompt_ids) + len(example.completion_ids) == 30


def test_eos_is_part_of_the_completion() -> None:
    rows = _rows(["abc"])
    budget, (example,) = plan_budget(rows, PROMPT, COMPLETION, CharEncoder(), _request(eos_ids=(0,)))
    assert example.completion_ids[-1] == 0
    assert budget.max_completion_tokens == 5
