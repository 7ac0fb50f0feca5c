"""Map dotted key paths of a TOML or JSON document to line and column.

tomllib and json give values without positions; diagnostics need positions. These scanners read
the text once and record where each key path is defined, well enough for error messages (they
do not validate: the real parsers have already accepted the document).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

Position = tuple[int, int]  # (line, column), both 1-based

_TOML_BARE = r"[A-Za-z0-9_-]+"
_TOML_KEY = rf'(?:{_TOML_BARE}|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_TOML_DOTTED = rf"{_TOML_KEY}(?:\s*\.\s*{_TOML_KEY})*"
_TABLE = re.compile(rf"^\s*\[\s*({_TOML_DOTTED})\s*\]")
_ARRAY_TABLE = re.compile(rf"^\s*\[\[\s*({_TOML_DOTTED})\s*\]\]")
_ASSIGN = re.compile(rf"^(\s*)({_TOML_DOTTED})\s*=")
_INLINE_KEY = re.compile(rf"([{{,]\s*)({_TOML_KEY})\s*=")


def _split_dotted(dotted: str) -> list[str]:
    parts = re.findall(_TOML_KEY, dotted)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


@dataclass
class SourceMap:
    """Positions of key paths in one file, plus its lines for quoting."""

    lines: list[str]
    positions: dict[tuple[str, ...], Position] = field(default_factory=dict)
    duplicates: list[tuple[tuple[str, ...], Position]] = field(default_factory=list)  # JSON keys given twice

    def locate(self, path: tuple[str | int, ...]) -> tuple[Position | None, tuple[str, ...]]:
        """Position of the longest recorded prefix of `path`, and that prefix."""
        keys = tuple(str(p) for p in path)
        for end in range(len(keys), 0, -1):
            pos = self.positions.get(keys[:end])
            if pos is not None:
                return pos, keys[:end]
        return None, ()

    def line_text(self, line: int) -> str | None:
        return self.lines[line - 1] if 0 < line <= len(self.lines) else None


def toml_source_map(text: str) -> SourceMap:
    smap = SourceMap(lines=text.splitlines())
    table: tuple[str, ...] = ()
    array_counts: dict[tuple[str, ...], int] = {}
    in_multiline: str | None = None
    for lineno, line in enumerate(smap.lines, start=1):
        if in_multiline:
            if line.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        if m := _ARRAY_TABLE.match(line):
            base = tuple(_split_dotted(m.group(1)))
            index = array_counts.get(base, -1) + 1
            array_counts[base] = index
            table = base + (str(index),)
            for end in range(1, len(base) + 1):  # [[a.b]] also defines table a
                smap.positions.setdefault(base[:end], (lineno, m.start(1) + 1))
            smap.positions[table] = (lineno, m.start(1) + 1)
            continue
        if m := _TABLE.match(line):
            table = _resolve_table(tuple(_split_dotted(m.group(1))), array_counts)
            for end in range(1, len(table) + 1):  # [a.b] also defines table a
                smap.positions.setdefault(table[:end], (lineno, m.start(1) + 1))
            continue
        if m := _ASSIGN.match(line):
            key = table + tuple(_split_dotted(m.group(2)))
            smap.positions.setdefault(key, (lineno, m.start(2) + 1))
            rest = line[m.end():]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_multiline = quote
            if "{" in rest:
                _inline_keys(smap, key, line, m.end(), lineno)
    return smap


def _inline_keys(smap: SourceMap, key: tuple[str, ...], line: str, start: int, lineno: int) -> None:
    """Keys of inline tables on one line: `k = { a = 1 }` and `k = [{ a = 1 }, { a = 2 }]`
    (the latter numbered by element, k.0.a and k.1.a). Strings are not parsed: a brace inside a
    quoted value can shift the numbering, which only costs a less precise position."""
    depth_brackets = 0
    element = -1
    table_start = None
    for i in range(start, len(line)):
        ch = line[i]
        if ch == "[":
            depth_brackets += 1
        elif ch == "]":
            depth_brackets -= 1
        elif ch == "{" and table_start is None:
            table_start = i
            if depth_brackets:
                element += 1
        elif ch == "}" and table_start is not None:
            prefix = key + ((str(element),) if depth_brackets else ())
            if depth_brackets:
                smap.positions.setdefault(prefix, (lineno, table_start + 1))
            for im in _INLINE_KEY.finditer(line[: i + 1], table_start):
                smap.positions.setdefault(prefix + tuple(_split_dotted(im.group(2))), (lineno, im.start(2) + 1))
            table_start = None


def _resolve_table(path: tuple[str, ...], array_counts: dict[tuple[str, ...], int]) -> tuple[str, ...]:
    """`[stages.data]` after `[[stages]]` means the data table of the latest stages element."""
    out: list[str] = []
    for part in path:
        out.append(part)
        if tuple(out) in array_counts and len(out) < len(path):
            out.append(str(array_counts[tuple(out)]))
    return tuple(out)


class _JsonScanner:
    """A minimal JSON walker recording the position of every member key and array element."""

    def __init__(self, text: str, smap: SourceMap):
        self.text, self.smap, self.i = text, smap, 0
        self.line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]

    def pos(self, offset: int) -> Position:
        import bisect

        line = bisect.bisect_right(self.line_starts, offset)
        return line, offset - self.line_starts[line - 1] + 1

    def ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i] in " \t\r\n":
            self.i += 1

    def string(self) -> str:
        import json

        end = self.i + 1
        while self.text[end] != '"':
            end += 2 if self.text[end] == "\\" else 1
        value = json.loads(self.text[self.i : end + 1])
        self.i = end + 1
        return value

    def value(self, path: tuple[str, ...]) -> None:
        self.ws()
        ch = self.text[self.i]
        if ch == "{":
            self.i += 1
            self.ws()
            while self.text[self.i] != "}":
                self.ws()
                start = self.i
                key = self.string()
                if path + (key,) in self.smap.positions:
                    self.smap.duplicates.append((path + (key,), self.pos(start)))
                self.smap.positions.setdefault(path + (key,), self.pos(start))
                self.ws()
                self.i += 1  # ':'
                self.value(path + (key,))
                self.ws()
                if self.text[self.i] == ",":
                    self.i += 1
                    self.ws()
            self.i += 1
        elif ch == "[":
            self.i += 1
            index = 0
            self.ws()
            while self.text[self.i] != "]":
                self.ws()
                self.smap.positions.setdefault(path + (str(index),), self.pos(self.i))
                self.value(path + (str(index),))
                index += 1
                self.ws()
                if self.text[self.i] == ",":
                    self.i += 1
            self.i += 1
        elif ch == '"':
            self.string()
        else:
            while self.i < len(self.text) and self.text[self.i] not in ",]} \t\r\n":
                self.i += 1


def json_source_map(text: str) -> SourceMap:
    smap = SourceMap(lines=text.splitlines())
    try:
        _JsonScanner(text, smap).value(())
    except (IndexError, ValueError):
        pass  # positions are a courtesy; the JSON parser reports syntax errors itself
    return smap
