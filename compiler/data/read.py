"""Read a recipe's data into rows, clean and derive fields, check them, and split reproducibly.

Reading never stops at the first bad row: every problem is collected with its file, line and a
category (the categories of `compiler.data.records`), and the data set's `bad_rows` policy decides
whether the compile fails or the rows are left out and reported.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.data.records import RowProblem, check_record
from compiler.diagnostics import Diagnostic, RecipeError
from compiler.loading.loader import LoadedRecipe
from compiler.loading.recipe import Dataset, DeriveBins


@dataclass(frozen=True)
class Row:
    """One example. `line` is where it starts in the source file (1-based), for error messages."""

    line: int
    fields: dict[str, Any]
    file: str = ""


@dataclass(frozen=True)
class Split:
    train: tuple[Row, ...]
    heldout: tuple[Row, ...]
    seed: int
    heldout_fraction: float

    def heldout_lines_sha256(self) -> str:
        """Fingerprint of which rows were held out, so a reviewer sees when the split changes."""
        keys = sorted((r.file, r.line) for r in self.heldout)
        lines = ",".join(f"{f}:{n}" if f else str(n) for f, n in keys)
        return hashlib.sha256(lines.encode()).hexdigest()


@dataclass
class DataReport:
    """What reading found: the good rows, and every problem by row."""

    rows: list[Row] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)
    n_records: int = 0

    def errors(self) -> list[RowProblem]:
        return [p for p in self.problems if p.severity == "error"]

    def counts(self, severity: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            if p.severity == severity:
                out[p.category] = out.get(p.category, 0) + 1
        return dict(sorted(out.items()))


def read_dataset(paths: list[Path], ds: Dataset, fmt: str, display: str) -> DataReport:
    """Parse the files (`fmt`: tsv, csv, json or jsonl), rename fields, check each record against
    the data set's format, then apply `html_unescape` and `derive` to the good ones."""
    report = DataReport()
    for path in paths:
        shown = display if len(paths) == 1 else f"{display}/{path.name}"
        text = "" if fmt == "parquet" else _read_text(path, shown)
        if fmt == "parquet":
            records = _read_parquet(path, shown)
        elif fmt in ("tsv", "csv"):
            records = _read_delimited(text, "\t" if fmt == "tsv" else ",", ds.columns, shown, report)
        elif fmt == "json":
            records = _read_json_array(text, shown)
        else:
            records = _read_jsonl(text, shown, report)
        if len(paths) > 1:
            records = [Row(r.line, r.fields, path.name) for r in records]
        report.rows += records
    return check_rows(report.rows, ds, display, report)


def check_rows(rows: list[Row], ds: Dataset, display: str, report: DataReport | None = None) -> DataReport:
    """Rename, check against the format, unescape and derive; problems go into the report."""
    report = report or DataReport()
    if ds.max_rows is not None:
        rows = rows[: ds.max_rows]
    report.n_records = len(rows) + sum(1 for p in report.problems if p.severity == "error")
    good = []
    for row in rows:
        fields = _renamed(row.fields, ds.fields)
        for name in ds.html_unescape:
            if isinstance(fields.get(name), str):
                fields[name] = html.unescape(fields[name])
        derived = []
        for derive in ds.derive:
            value, problem = _bin(derive, fields.get(derive.source))
            if problem:
                derived.append(RowProblem(row.file or display, row.line, "not_a_number", problem))
            fields[derive.name] = value
        # Derived fields count as the format's fields (e.g. preference pairs cut from a score).
        problems = check_record(fields, ds.format, row.file or display, row.line) + derived
        if ds.format == "instruction":
            fields.setdefault("input", "")
        report.problems += problems
        if not any(p.severity == "error" for p in problems):
            good.append(Row(row.line, fields, row.file))
    report.rows = good
    return report


def read_rows(paths: list[Path], ds: Dataset, fmt: str, display: str) -> list[Row]:
    """The rows of a data set, failing (with every bad row listed) when any row is bad."""
    report = read_dataset(paths, ds, fmt, display)
    if report.errors():
        raise RecipeError(problem_diagnostics(report.errors()))
    return report.rows


def problem_diagnostics(problems: list[RowProblem], limit: int = 20) -> list[Diagnostic]:
    """The first `limit` problems as diagnostics, then one line counting the rest by category."""
    out = [p.diagnostic() for p in problems[:limit]]
    rest = problems[limit:]
    if rest:
        counts: dict[str, int] = {}
        for p in rest:
            counts[p.category] = counts.get(p.category, 0) + 1
        summary = ", ".join(f"{n} {c}" for c, n in sorted(counts.items()))
        out.append(Diagnostic("error", f"... and {len(rest)} more problems ({summary})"))
    return out


def apply_bad_rows_policy(loaded: LoadedRecipe, name: str, report: DataReport
                          ) -> tuple[list[Row], list[Diagnostic], dict[str, Any]]:
    """Fail on bad rows, or (policy = "skip") leave them out within the allowed share; warnings
    are summarised one line per category."""
    ds = loaded.recipe.data[name]
    errors = report.errors()
    bad_rows = sorted({(p.file, p.line) for p in errors})
    checks = {"errors": report.counts("error"), "warnings": report.counts("warning"), "skipped_rows": 0}
    at = loaded.where(("data", name, "bad_rows")) if "bad_rows" in ds.model_fields_set else loaded.where(("data", name))
    if errors and ds.bad_rows.policy == "fail":
        summary = ", ".join(f"{n} {c}" for c, n in checks["errors"].items())
        raise RecipeError(problem_diagnostics(errors) + [Diagnostic(
            "error", f"data set \"{name}\": {len(bad_rows)} of {report.n_records} rows fail the checks ({summary})",
            help=f'fix the rows, or set [data.{name}.bad_rows] policy = "skip" (with max_fraction) to leave them out',
            **at)])
    if errors:
        share = len(bad_rows) / max(1, report.n_records)
        if share > ds.bad_rows.max_fraction:
            raise RecipeError(problem_diagnostics(errors) + [Diagnostic(
                "error", f"data set \"{name}\": {len(bad_rows)} of {report.n_records} rows ({share:.1%}) fail the "
                f"checks, more than bad_rows.max_fraction = {ds.bad_rows.max_fraction}", **at)])
        checks["skipped_rows"] = len(bad_rows)
    warnings = []
    if errors:
        summary = ", ".join(f"{n} {c}" for c, n in checks["errors"].items())
        lines = ", ".join(str(line) for _, line in bad_rows[:10]) + (" ..." if len(bad_rows) > 10 else "")
        warnings.append(Diagnostic("warning", f"data set \"{name}\": left out {len(bad_rows)} bad rows ({summary}; "
                                   f"lines {lines})", **at))
    for category, count in checks["warnings"].items():
        lines = [p.line for p in report.problems if p.category == category][:10]
        warnings.append(Diagnostic("warning", f"data set \"{name}\": {count} rows: {category} (lines "
                                   f"{', '.join(map(str, lines))}{' ...' if count > 10 else ''})",
                                   **loaded.where(("data", name))))
    return report.rows, warnings, checks


_MISSING = object()


def _renamed(record: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    fields = dict(record)
    for target, source in renames.items():
        if source in fields:
            fields[target] = fields.pop(source)
        elif "." in source:
            found = _walk(record, source)
            if found is not _MISSING:
                fields[target] = found
    return fields


def _walk(record: dict[str, Any], dotted: str) -> Any:
    """`instances.0.output` -> record["instances"][0]["output"], or _MISSING."""
    node: Any = record
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _read_text(path: Path, display: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError.single(
            f"{display} is not UTF-8 (byte {exc.start}, line {line})",
            file=display,
            line=line,
            help="re-encode the file as UTF-8",
        ) from None


MAX_FIELD_CHARS = 16 * 1024 * 1024  # one cell of a CSV/TSV file (the csv module's default is 128 KiB)


def _read_delimited(text: str, delimiter: str, columns: list[str] | None, display: str,
                    report: DataReport) -> list[Row]:
    # Source files arrive with CRLF line ends; csv handles them when given newline="" semantics.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_NONE)
    # QUOTE_NONE: one record per physical line, so reader.line_num is that record's line.
    records, line_numbers = [], []
    csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        for record in reader:
            records.append(record)
            line_numbers.append(reader.line_num)
    except csv.Error as exc:
        raise RecipeError.single(f"{display}: {exc}", file=display, line=reader.line_num + 1,
                                 help=f"no field may be longer than {MAX_FIELD_CHARS:,} characters") from None
    start = 0
    if columns is None:
        if not records:
            raise RecipeError.single(f"{display} is empty", file=display)
        columns, start = records[0], 1
    rows = []
    for index in range(start, len(records)):
        record, line = records[index], line_numbers[index]
        if not record or record == [""]:
            continue
        if len(record) != len(columns):
            report.problems.append(RowProblem(
                display, line, "wrong_field_count",
                f"row has {len(record)} fields, expected {len(columns)} ({', '.join(columns)})",
                help="check for stray delimiters in this row, or fix data.columns",
            ))
            continue
        rows.append(Row(line, dict(zip(columns, record))))
    return rows


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _read_jsonl(text: str, display: str, report: DataReport) -> list[Row]:
    rows = []
    # Lines end at \r\n, \r or \n only: str.splitlines() would also split at U+2028, U+2029 and
    # U+0085, which JSON allows unescaped inside strings.
    for line_number, line in enumerate(_LINE_BREAK.split(text), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            report.problems.append(RowProblem(display, line_number, "invalid_json", f"invalid JSON: {exc.msg}",
                                              column=exc.colno))
            continue
        except (ValueError, RecursionError) as exc:  # thousands of digits in one number; absurd nesting
            reason = str(exc) if isinstance(exc, ValueError) else "values nested too deeply"
            report.problems.append(RowProblem(display, line_number, "invalid_json", f"invalid JSON: {reason}"))
            continue
        if not isinstance(value, dict):
            report.problems.append(RowProblem(display, line_number, "data_type",
                                              f"each line must be a JSON object, found {_kind(value)}"))
            continue
        rows.append(Row(line_number, value))
    return rows


def _read_parquet(path: Path, display: str) -> list[Row]:
    """Rows of a Parquet file (pyarrow, which `datasets` brings); `line` is the 1-based row number."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise RecipeError.single(f"{display} is not a readable Parquet file: {exc}", file=display) from None
    return [Row(i + 1, record) for i, record in enumerate(table.to_pylist())]


def read_hub_rows(name: str, split: str, revision: str | None) -> list[Row]:
    """A hub data set through `datasets`, when the hub is reachable (or the data set is cached with
    HF_DATASETS_OFFLINE=1). Raises RecipeError saying which, quickly, instead of retrying for minutes."""
    import os
    import socket
    from urllib.parse import urlparse

    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or ""
        try:
            socket.getaddrinfo(host, 443)
        except OSError as exc:
            raise RecipeError.single(
                f"data set {json.dumps(name)} is on the Hugging Face hub, which is not reachable from here "
                f"({host}: {exc.strerror or exc})",
                help="download it on a machine with access (datasets.load_dataset(...).to_json(...)) and use "
                "source.path, or set HF_DATASETS_OFFLINE=1 to read it from the local datasets cache",
            ) from None
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split, revision=revision)
    except Exception as exc:  # datasets raises many types: not found, gated, offline cache miss
        raise RecipeError.single(f"cannot load hub data set {json.dumps(name)} (split {split}): {exc}") from None
    return [Row(i + 1, dict(record)) for i, record in enumerate(loaded)]


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(value), "a number")


def _read_json_array(text: str, display: str) -> list[Row]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError.single(f"invalid JSON: {exc.msg}", file=display, line=exc.lineno, column=exc.colno) from None
    except (ValueError, RecursionError) as exc:  # thousands of digits in one number; absurd nesting
        reason = str(exc) if isinstance(exc, ValueError) else "values nested too deeply"
        raise RecipeError.single(f"invalid JSON: {reason}", file=display) from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RecipeError.single(f"{display} must hold a JSON array of objects", file=display, line=1,
                                 help="or store one object per line as .jsonl")
    # Positions of the records: the line each top-level object starts on.
    lines, depth, line = [], 0, 1
    in_string = escaped = False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            if depth == 1 and ch == "{":
                lines.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    return [Row(n, v) for n, v in zip(lines, value)]


def _bin(derive: DeriveBins, value: Any) -> tuple[str | None, str | None]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, f"{derive.source} = {json.dumps(value)} is not a number (needed to derive \"{derive.name}\")"
    edges, labels = derive.edges, derive.labels
    if number < edges[0]:
        return labels[0], None
    if number > edges[-1]:
        return labels[-1], None
    # Interior bins: [edges[i-1], edges[i]); a value on the outer edges belongs to the middle.
    for i in range(1, len(edges)):
        if number < edges[i]:
            return labels[i], None
    return labels[-2], None


def split_rows(rows: list[Row], heldout_fraction: float, seed: int) -> Split:
    """Seeded shuffle, then the first `round(n * fraction)` rows are held out."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_heldout = round(len(rows) * heldout_fraction)
    heldout = tuple(rows[i] for i in sorted(order[:n_heldout]))
    train = tuple(rows[i] for i in sorted(order[n_heldout:]))
    return Split(train=train, heldout=heldout, seed=seed, heldout_fraction=heldout_fraction)
