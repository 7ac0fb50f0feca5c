"""Reading, cleaning, deriving and splitting rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from compiler.data.read import Row, read_rows, split_rows
from compiler.diagnostics import RecipeError
from compiler.loading.recipe import Dataset
from tests.conftest import TINY_TSV


def _section(**extra) -> Dataset:
    base = {
        "source": {"path": "x"},
        "format": "columns",
        "columns": ["id", "score", "text"],
        "html_unescape": ["text"],
        "derive": [{"name": "label", "from": "score", "edges": [-0.5, 0.5],
                    "labels": ["negative", "neutral", "positive"]}],
    }
    return Dataset.model_validate({**base, **extra})


def test_tsv_with_crlf_entities_and_bins() -> None:
    rows = read_rows([TINY_TSV], _section(), "tsv", "tiny.tsv")
    assert len(rows) == 10
    assert [r.line for r in rows] == list(range(1, 11))
    assert rows[0].fields["text"] == "I love this so much & more"  # &amp; unescaped, no trailing \r
    labels = {r.fields["id"]: r.fields["label"] for r in rows}
    # strict outer bins: exactly +-0.5 is neutral
    assert labels["6"] == "neutral" and labels["7"] == "neutral"
    assert labels["1"] == "positive" and labels["2"] == "negative" and labels["3"] == "neutral"


def test_wrong_field_count_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text("1\t0.3\tfine\n2\tonly-two\n3\t0.1\tok\textra\n")
    with pytest.raises(RecipeError) as caught:
        read_rows([path], _section(), "tsv", "bad.tsv")
    lines = sorted(d.line for d in caught.value.diagnostics)
    assert lines == [2, 3]
    assert all("expected 3" in d.message for d in caught.value.diagnostics)


def test_non_numeric_score_for_a_bin_is_an_error_with_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text("1\t0.3\tfine\n2\thigh\ttext\n")
    with pytest.raises(RecipeError) as caught:
        read_rows([path], _section(), "tsv", "bad.tsv")
    (diag,) = caught.value.diagnostics
    assert diag.line == 2 and '"high" is not a number' in diag.message


def test_non_utf8_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "latin1.tsv"
    path.write_bytes("1\t0.3\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8"):
        read_rows([path], _section(), "tsv", "latin1.tsv")


def test_split_is_seeded_disjoint_and_complete() -> None:
    rows = [Row(i, {"x": i}) for i in range(1, 101)]
    a = split_rows(rows, 0.2, seed=3)
    b = split_rows(rows, 0.2, seed=3)
    c = split_rows(rows, 0.2, seed=4)
    assert a == b
    assert {r.line for r in a.heldout} != {r.line for r in c.heldout}
    assert len(a.heldout) == 20 and len(a.train) == 80
    assert {r.line for r in a.train} | {r.line for r in a.heldout} == set(range(1, 101))
    assert not {r.line for r in a.train} & {r.line for r in a.heldout}
    assert a.heldout_lines_sha256() == b.heldout_lines_sha256() != c.heldout_lines_sha256()


def test_jsonl_rows_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "score": 1}\n\n[1, 2]\n{"text": "b", "score": -1}\n{broken\n')
    with pytest.raises(RecipeError) as caught:
        read_rows([path], _section(columns=None, derive=[], html_unescape=[]), "jsonl", "d.jsonl")
    assert sorted(d.line for d in caught.value.diagnostics) == [3, 5]


def test_json_array_rows_carry_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"user_input": "a {b}", "completion": "x"},\n  {"user_input": "c",\n   "completion": "d"}\n]\n')
    rows = read_rows([path], Dataset.model_validate({"source": {"path": "x"}, "format": "completion"}), "json", "d.json")
    assert [r.line for r in rows] == [2, 3]
    assert rows[1].fields == {"user_input": "c", "completion": "d"}


def test_fields_are_renamed_and_missing_fields_reported_by_row(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "hi", "a": "yo"}\n{"q": "no answer"}\n')
    ds = Dataset.model_validate({"source": {"path": "x"}, "format": "completion",
                                 "fields": {"user_input": "q", "completion": "a"}})
    with pytest.raises(RecipeError) as caught:
        read_rows([path], ds, "jsonl", "d.jsonl")
    (diag,) = caught.value.diagnostics
    assert diag.line == 2 and 'no "completion"' in diag.message and "[missing_field]" in diag.message
    path.write_text('{"q": "hi", "a": "yo"}\n')
    (row,) = read_rows([path], ds, "jsonl", "d.jsonl")
    assert row.fields == {"user_input": "hi", "completion": "yo"}
