"""Read a recipe's data into rows, clean and derive columns, and split it reproducibly."""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.diagnostics import Diagnostic, RecipeError
from compiler.recipe import FORMAT_FIELDS, Dataset, DeriveBins


@dataclass(frozen=True)
class Row:
    """One example. `line` is where it starts in the source file (1-based), for error messages."""

    line: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class Split:
    train: tuple[Row, ...]
    heldout: tuple[Row, ...]
    seed: int
    heldout_fraction: float

    def heldout_lines_sha256(self) -> str:
        """Fingerprint of which rows were held out, so a reviewer sees when the split changes."""
        lines = ",".join(str(r.line) for r in sorted(self.heldout, key=lambda r: r.line))
        return hashlib.sha256(lines.encode()).hexdigest()


def read_rows(paths: list[Path], ds: Dataset, fmt: str, display: str) -> list[Row]:
    """Parse the files (`fmt`: tsv, csv, json or jsonl), rename fields, then apply
    `html_unescape` and `derive`. Every problem is reported with its row's line."""
    rows: list[Row] = []
    for path in paths:
        shown = display if len(paths) == 1 else f"{display}/{path.name}"
        text = _read_text(path, shown)
        if fmt in ("tsv", "csv"):
            rows += _read_delimited(text, "\t" if fmt == "tsv" else ",", ds.columns, shown)
        elif fmt == "json":
            rows += _read_json_array(text, shown)
        else:
            rows += _read_jsonl(text, shown)
    if ds.max_rows is not None:
        rows = rows[: ds.max_rows]
    errors: list[Diagnostic] = []
    out = []
    required = FORMAT_FIELDS[ds.format]
    for row in rows:
        fields = dict(row.fields)
        for target, source in ds.fields.items():
            if source in fields:
                fields[target] = fields.pop(source)
            elif "." in source:
                found = _walk(row.fields, source)
                if found is not _MISSING:
                    fields[target] = found
        missing = [f for f in required if f not in fields and not (f == "input" and ds.format == "instruction")]
        if missing:
            errors.append(Diagnostic("error", f"row has no {', '.join(repr(m) for m in missing)} ({ds.format} format)",
                                     file=display, line=row.line,
                                     help="map the file's keys with fields = { name = \"file_key\" }"))
            continue
        for name in ds.html_unescape:
            if isinstance(fields.get(name), str):
                fields[name] = html.unescape(fields[name])
        for derive in ds.derive:
            value, problem = _bin(derive, fields.get(derive.source))
            if problem:
                errors.append(Diagnostic("error", problem, file=display, line=row.line, key=derive.source))
            fields[derive.name] = value
        if ds.format == "instruction":
            fields.setdefault("input", "")
        out.append(Row(row.line, fields))
    if errors:
        raise RecipeError(_cap(errors))
    return out


_MISSING = object()


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
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError.single(
            f"{display} is not UTF-8 (byte {exc.start}, line {line})",
            file=display,
            line=line,
            help="re-encode the file as UTF-8",
        ) from None


def _read_json_array(text: str, display: str) -> list[Row]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError.single(f"invalid JSON: {exc.msg}", file=display, line=exc.lineno, column=exc.colno) from None
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


def _cap(errors: list[Diagnostic], limit: int = 20) -> list[Diagnostic]:
    if len(errors) <= limit:
        return errors
    more = Diagnostic("error", f"... and {len(errors) - limit} more rows with the same kind of problem")
    return errors[:limit] + [more]


def _read_delimited(text: str, delimiter: str, columns: list[str] | None, display: str) -> list[Row]:
    # Source files arrive with CRLF line ends; csv handles them when given newline="" semantics.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_NONE)
    # QUOTE_NONE: one record per physical line, so reader.line_num is that record's line.
    records, line_numbers = [], []
    for record in reader:
        records.append(record)
        line_numbers.append(reader.line_num)
    start = 0
    if columns is None:
        if not records:
            raise RecipeError.single(f"{display} is empty", file=display)
        columns, start = records[0], 1
    rows, errors = [], []
    for index in range(start, len(records)):
        record, line = records[index], line_numbers[index]
        if not record or record == [""]:
            continue
        if len(record) != len(columns):
            errors.append(
                Diagnostic(
                    "error",
                    f"row has {len(record)} fields, expected {len(columns)} ({', '.join(columns)})",
                    file=display,
                    line=line,
                    help="check for stray delimiters in this row, or fix data.columns",
                )
            )
            continue
        rows.append(Row(line, dict(zip(columns, record))))
    if errors:
        raise RecipeError(_cap(errors))
    return rows


def _read_jsonl(text: str, display: str) -> list[Row]:
    rows, errors = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(
                Diagnostic("error", f"invalid JSON: {exc.msg}", file=display, line=line_number, column=exc.colno)
            )
            continue
        if not isinstance(value, dict):
            errors.append(
                Diagnostic("error", f"each line must be a JSON object, found {type(value).__name__}",
                           file=display, line=line_number)
            )
            continue
        rows.append(Row(line_number, value))
    if errors:
        raise RecipeError(_cap(errors))
    return rows


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
