"""Bad rows at scale: a data file with bad rows of every category the data checks know, spread
through thousands of good ones; every bad row is reported with its line and its categories,
every good row is kept, and `recipe data check` counts them all.

The generator is shared with benchmarks/bad_data_scale.py, which runs it at 100,000 rows per
file and times `recipe data check` against its budget.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from compiler.data.read import read_dataset
from compiler.loading.recipe import Dataset
from tests.conftest import run_cli


@dataclass(frozen=True)
class BadKind:
    """One way a row can be wrong: how to write it, and the problems the checks must report."""

    name: str
    line: Callable[[int], str]
    errors: tuple[str, ...]  # error categories, one per expected occurrence
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataFile:
    """A file to check: its record shape, how a good row looks, and every kind of bad row."""

    name: str
    format: str
    suffix: str
    good: Callable[[int], str]
    kinds: tuple[BadKind, ...]
    columns: tuple[str, ...] | None = None


def _chat(*messages: object) -> str:
    return json.dumps({"messages": list(messages)})


SYSTEM = {"role": "system", "content": "Answer in one word."}


def _user(i: int) -> dict:
    return {"role": "user", "content": f"What is {i} plus one?"}


def _assistant(i: int) -> dict:
    return {"role": "assistant", "content": str(i + 1)}


CHAT = DataFile("chat", "openai-chat", "jsonl", lambda i: _chat(SYSTEM, _user(i), _assistant(i)), (
    BadKind("cut-off JSON", lambda i: '{"messages": [{"role": "user", "content": "cut o', ("invalid_json",)),
    BadKind("line not an object", lambda i: json.dumps(["user", f"hello {i}"]), ("data_type",)),
    BadKind("message not an object", lambda i: _chat(SYSTEM, _user(i), f"note {i}", _assistant(i)), ("data_type",)),
    BadKind("no messages list", lambda i: json.dumps({"prompt": f"hello {i}"}), ("missing_messages_list",)),
    BadKind("message without content", lambda i: _chat(SYSTEM, {"role": "user"}, _assistant(i)),
            ("message_missing_key", "missing_content")),
    BadKind("unknown message key", lambda i: _chat(SYSTEM, {**_user(i), "mood": "curious"}, _assistant(i)),
            ("message_unrecognized_key",)),
    BadKind("unknown role", lambda i: _chat(SYSTEM, _user(i), {"role": "robot", "content": "beep"}, _assistant(i)),
            ("unrecognized_role",)),
    BadKind("empty content", lambda i: _chat(SYSTEM, {"role": "user", "content": ""}, _assistant(i)),
            ("missing_content",)),
    BadKind("no assistant", lambda i: _chat(SYSTEM, _user(i)), ("example_missing_assistant_message",)),
    BadKind("no system message", lambda i: _chat(_user(i), _assistant(i)), (), ("missing_system_message",)),
    BadKind("no user message", lambda i: _chat(SYSTEM, _assistant(i)), (), ("missing_user_message",)),
))


def _scored(**fields: object) -> str:
    return json.dumps(fields)


SCORED = DataFile("scored", "scored", "jsonl",
                  lambda i: _scored(user_input=f"Rate review {i}", completion="fine", score=i % 7 - 3), (
    BadKind("cut-off JSON", lambda i: '{"user_input": "Rate rev', ("invalid_json",)),
    BadKind("line not an object", lambda i: json.dumps(f"review {i}"), ("data_type",)),
    BadKind("no completion", lambda i: _scored(user_input=f"Rate review {i}", score=1), ("missing_field",)),
    BadKind("no score", lambda i: _scored(user_input=f"Rate review {i}", completion="ok"), ("missing_field",)),
    BadKind("number as completion", lambda i: _scored(user_input=f"Rate review {i}", completion=i, score=1),
            ("wrong_type",)),
    BadKind("score not a number", lambda i: _scored(user_input=f"Rate review {i}", completion="ok", score="high"),
            ("not_a_number",)),
    BadKind("blank completion", lambda i: _scored(user_input=f"Rate review {i}", completion="  ", score=1), (),
            ("empty_field",)),
))

TSV = DataFile("scored-tsv", "scored", "tsv", lambda i: f"Rate review {i}\tfine\t{i % 7 - 3}", (
    BadKind("extra field", lambda i: f"Rate review {i}\tfine\t1\tstray", ("wrong_field_count",)),
    BadKind("missing field", lambda i: f"Rate review {i}\t1", ("wrong_field_count",)),
    BadKind("score not a number", lambda i: f"Rate review {i}\tfine\tn/a", ("not_a_number",)),
    BadKind("blank completion", lambda i: f"Rate review {i}\t \t1", (), ("empty_field",)),
), columns=("user_input", "completion", "score"))

FILES = (CHAT, SCORED, TSV)


@dataclass(frozen=True)
class Written:
    path: Path
    rows: int
    expected: dict[int, tuple[str, ...]]  # line -> error categories, for every bad row
    warnings: dict[int, tuple[str, ...]]  # line -> warning categories

    def counts(self, which: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for categories in (self.expected if which == "errors" else self.warnings).values():
            for category in categories:
                out[category] = out.get(category, 0) + 1
        return dict(sorted(out.items()))


def write_file(spec: DataFile, folder: Path, rows: int, per_kind: int, seed: int = 0) -> Written:
    """`rows` lines, `per_kind` of each bad kind at random lines, the rest good."""
    rng = random.Random(seed)
    lines = rng.sample(range(1, rows + 1), per_kind * len(spec.kinds))
    kind_at = {line: spec.kinds[i // per_kind] for i, line in enumerate(lines)}
    expected, warnings, text = {}, {}, []
    for line in range(1, rows + 1):
        kind = kind_at.get(line)
        text.append(kind.line(line) if kind else spec.good(line))
        if kind and kind.errors:
            expected[line] = kind.errors
        if kind and kind.warnings:
            warnings[line] = kind.warnings
    path = folder / f"{spec.name}-{rows}.{spec.suffix}"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return Written(path, rows, expected, warnings)


def reported_lines(spec: DataFile, written: Written) -> tuple[dict[int, tuple[str, ...]], dict[int, tuple[str, ...]],
                                                                list[int]]:
    """What the data checks report, by line: (errors, warnings, lines of the rows kept). This is
    the reader `recipe data check` and `recipe compile` share (compiler.data.read.read_dataset)."""
    ds = Dataset.model_validate({"source": {"path": str(written.path)}, "format": spec.format,
                                 "file_format": spec.suffix, "columns": list(spec.columns) if spec.columns else None})
    report = read_dataset([written.path], ds, spec.suffix, written.path.name)
    errors: dict[int, tuple[str, ...]] = {}
    warnings: dict[int, tuple[str, ...]] = {}
    for p in report.problems:
        into = errors if p.severity == "error" else warnings
        into[p.line] = (*into.get(p.line, ()), p.category)
    return errors, warnings, [row.line for row in report.rows]


def data_check_argv(spec: DataFile, written: Written) -> list[str]:
    argv = ["data", "check", str(written.path), "--format", spec.format, "--json"]
    return argv + (["--columns", ",".join(spec.columns)] if spec.columns else [])


ROWS, PER_KIND = 5_000, 20


@pytest.mark.parametrize("spec", FILES, ids=[f.name for f in FILES])
def test_every_bad_row_is_reported_with_its_line(spec: DataFile, tmp_path: Path) -> None:
    written = write_file(spec, tmp_path, ROWS, PER_KIND)
    errors, warnings, kept = reported_lines(spec, written)
    assert errors == written.expected  # every bad row, at its line, with exactly its categories
    assert warnings == written.warnings
    assert sorted(kept) == sorted(set(range(1, ROWS + 1)) - set(written.expected))  # nothing dropped silently


@pytest.mark.parametrize("spec", FILES, ids=[f.name for f in FILES])
def test_data_check_counts_every_bad_row(spec: DataFile, tmp_path: Path) -> None:
    written = write_file(spec, tmp_path, ROWS, PER_KIND, seed=1)
    result = run_cli(*data_check_argv(spec, written), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr  # errors found: exit 1
    report = json.loads(result.stdout)
    assert report["n_examples"] == ROWS
    assert report["errors"] == written.counts("errors")
    assert {k: v for k, v in report["warnings"].items() if k != "over_token_limit"} == written.counts("warnings")


def test_unicode_line_separators_inside_a_json_string_keep_one_row_per_line(tmp_path: Path) -> None:
    rows = [{"messages": [SYSTEM, {"role": "user", "content": f"a{sep}b"}, _assistant(1)]}
            for sep in ("\u2028", "\u0085", "\u2029")]
    rows.append({"messages": [SYSTEM, _user(2), {"role": "robot", "content": "beep"}, _assistant(2)]})
    path = tmp_path / "separators.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    errors, _, kept = reported_lines(CHAT, Written(path, len(rows), {}, {}))
    assert kept == [1, 2, 3]
    assert errors == {4: ("unrecognized_role",)}
