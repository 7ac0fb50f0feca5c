"""The token budget: percentile choice, truncation of marked fields only, never the completion."""

from __future__ import annotations

from typing import Sequence

import pytest

from compiler.data.read import Row
from compiler.data.templating import compile_template
from compiler.data.token_budget import (
    BudgetError,
    BudgetRequest,
    LengthStats,
    choose_max_total,
    nearest_rank,
    plan_budget,
)


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


TWO_FIELDS = compile_template("{{ a }}|{{ b }}|")  # 2 fixed characters


def test_truncation_follows_the_declared_order() -> None:
    rows = [Row(1, {"a": "x" * 10, "b": "y" * 10, "label": "z"})]
    request = _request(max_total_tokens=17, truncatable=("b", "a"))  # 2 + 20 + 4 (" yes" style) -> cut 6 from b
    budget, (example,) = plan_budget(rows, TWO_FIELDS, compile_template(" {{ label }}"), CharEncoder(), request)
    assert CharEncoder().decode(example.prompt_ids) == "x" * 10 + "|" + "y" * 3 + "|"
    assert example.removed_by_field == {"b": 7}
    assert budget.removed_by_field == {"b": 7, "a": 0}
    request = _request(max_total_tokens=17, truncatable=("a", "b"))
    _, (example,) = plan_budget(rows, TWO_FIELDS, compile_template(" {{ label }}"), CharEncoder(), request)
    assert CharEncoder().decode(example.prompt_ids) == "x" * 3 + "|" + "y" * 10 + "|"


def test_overflow_fails_by_default_and_names_the_rows() -> None:
    rows = _rows(["abc", "d", "e"], label="long-label")
    rows[1] = Row(2, {"text": "d", "label": "ok"})
    with pytest.raises(BudgetError) as caught:
        plan_budget(rows, PROMPT, COMPLETION, CharEncoder(), _request(max_total_tokens=12))
    assert caught.value.lines == (1, 3)
    assert "would lose supervised tokens" in str(caught.value)
    # an allowance smaller than the overflow still fails
    with pytest.raises(BudgetError, match="overflow_allowed = 1"):
        plan_budget(rows, PROMPT, COMPLETION, CharEncoder(),
                    _request(max_total_tokens=12, overflow="drop", overflow_allowed=1))


def test_overflow_drop_and_truncate_are_counted() -> None:
    rows = _rows(["abc", "d", "e"], label="long-label")  # fixed part 6 + 11 = 17 > 12
    rows[1] = Row(2, {"text": "d", "label": "ok"})  # 6 + 1 + 3 = 10 fits
    budget, examples = plan_budget(rows, PROMPT, COMPLETION, CharEncoder(),
                                   _request(max_total_tokens=12, overflow="drop", overflow_allowed=2))
    assert [e is None for e in examples] == [True, False, True]
    assert (budget.n_dropped, budget.n_label_truncated, budget.overflow_lines) == (2, 0, (1, 3))
    budget, examples = plan_budget(rows, PROMPT, COMPLETION, CharEncoder(),
                                   _request(max_total_tokens=12, overflow="truncate", overflow_allowed=2))
    assert budget.n_dropped == 0 and budget.n_label_truncated == 2
    first = examples[0]
    assert CharEncoder().decode(first.prompt_ids) == "Q: \nA:"  # the text field emptied first
    assert CharEncoder().decode(first.completion_ids) == " long-"  # then the label cut to fit 12
    assert first.label_tokens_removed == 5


def test_profile_has_p90_fields_and_a_histogram() -> None:
    texts = ["a" * n for n in range(1, 101)]
    budget, _ = plan_budget(_rows(texts), PROMPT, COMPLETION, CharEncoder(), _request())
    assert (budget.total.p50, budget.total.p90, budget.total.max) == (60, 100, 110)
    assert budget.fields["text"].p90 == 90 and budget.fields["text"].min == 1
    bins = {b["below"]: b["count"] for b in budget.histogram}
    assert bins == {8: 0, 16: 5, 32: 16, 64: 32, 128: 47}  # totals 11..110: 11-15, 16-31, 32-63, 64-110
    assert sum(bins.values()) == 100


def test_one_chooser_names_what_it_measured_and_caps_at_the_model() -> None:
    totals = list(range(1, 101))
    chat = choose_max_total(totals, _request(coverage=0.9, round_to=8), unit="rendered conversation")
    assert chat == (96, "90% of rendered conversations are at most 90 tokens; rounded up to a multiple of 8")
    longest = choose_max_total(totals, _request(round_to=8, n_positions_cap=64), unit="rendered conversation")
    assert longest == (64, "the longest rendered conversation is 100 tokens; rounded up to a multiple of 8; "
                       "capped at the model's context length 64")
    assert choose_max_total([], _request(max_total_tokens=32)) == (32, "set in the recipe (tokens.max_total = 32)")
    with pytest.raises(BudgetError, match="exceeds the model's context length 16"):
        choose_max_total([], _request(max_total_tokens=32, n_positions_cap=16))
