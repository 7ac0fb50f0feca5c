"""Property-based tests: arbitrary recipe files and data files fed to `recipe validate` and
`recipe data check` end in success (exit 0) or a clean diagnostic (exit 1), never exit 2 or an
exception. Everything runs in-process through `compiler.cli.main`.

The generators and `outcome()` are shared with benchmarks/robustness.py, which runs the same
properties on 10,000+ cases; CI runs a smaller slice here. Inputs that fuzzing once found to
crash (exit 2) are kept as regression cases at the bottom.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import tempfile
import traceback
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.cli import FORMAT_NAMES, main
from tests.conftest import base_recipe

CI_EXAMPLES = 150
CI_SETTINGS = settings(max_examples=CI_EXAMPLES, deadline=None, database=None,
                       suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Nesting stays well below the depth where Python's parsers recurse too far (see KNOWN_CRASHES).
MAX_NESTING = 40

# --- running one case -------------------------------------------------------------------------


@contextlib.contextmanager
def cached_tokenizer():
    """`recipe data check` builds cl100k_base from its ranks file on every call (~0.3 s); reuse one
    across cases so thousands of them run in seconds. Behaviour is otherwise unchanged."""
    import compiler.data.billing

    original = compiler.data.billing.cl100k_encoding
    compiler.data.billing.cl100k_encoding = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        compiler.data.billing.cl100k_encoding = original


def outcome(argv: list[str]) -> tuple[int | str, str]:
    """(exit code, or the exception's name when `main` raised; stderr text) of one CLI call."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except BaseException as exc:  # noqa: BLE001 - any escape from main is the failure counted
            return type(exc).__name__, err.getvalue() + traceback.format_exc()
    return code, err.getvalue()


def is_clean(code: int | str, stderr: str) -> bool:
    """Success, or a diagnostic the user can act on: no exit 2, no exception, no traceback."""
    return code in (0, 1) and "Traceback" not in stderr


def write_case(directory: Path, name: str, content: bytes | str) -> Path:
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# --- generators -------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12,
)

_TOML_PIECES = [
    "[", "]", "[[", "]]", "{", "}", "=", ",", ".", '"', "'", '"""', "#", "\n", " ", "\t", "\\", "\\u00e9", "\\U0001F600",
    "name", "model", "data", "tweets", "template", "prompt", "stages", "train", "tokens", "eval", "source", "path",
    "format", "columns", "kind", "sft", "init", "scratch", "1", "-0", "1e999", "nan", "inf", "0x1F", "1979-05-27T07:32:00Z",
    "true", "false", "{{ text }}", "\x00", "\x7f", "é",
]
_JSON_PIECES = ["{", "}", "[", "]", ":", ",", '"', "\\", "\\u0000", "\\ud83d", "null", "true", "1", "-1.5e3", "NaN",
                "Infinity", '"name"', '"data"', '"stages"', '"model"', " ", "\n", "\ufeff"]

toml_like_text = st.lists(st.sampled_from(_TOML_PIECES), max_size=60).map("".join)
json_like_text = st.lists(st.sampled_from(_JSON_PIECES), max_size=60).map("".join)


def _toml_value(value: Any) -> str:
    """A TOML inline value (TOML has no null: None becomes an empty string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    return '""'


def to_toml(document: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(str(k), ensure_ascii=False)} = {_toml_value(v)}\n" for k, v in document.items())


def _containers(value: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every dict and list inside `value`, itself included."""
    found = [path] if isinstance(value, (dict, list)) else []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found += _containers(child, path + (key,))
    return found


def _at(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


@st.composite
def mutated_recipes(draw) -> dict[str, Any]:
    """base_recipe() with 1-4 edits: a key dropped, a value replaced by any JSON value, an unknown
    key inserted, or a value wrapped in nested lists/objects."""
    recipe = base_recipe()
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        container = _at(recipe, draw(st.sampled_from(_containers(recipe))))
        keys = list(container) if isinstance(container, dict) else list(range(len(container)))
        op = draw(st.sampled_from(["drop", "replace", "insert", "nest"]))
        if op == "insert" or not keys:
            if isinstance(container, dict):
                container[draw(st.text(max_size=12))] = draw(json_values)
            else:
                container.append(draw(json_values))
            continue
        key = draw(st.sampled_from(keys))
        if op == "drop":
            del container[key]
        elif op == "replace":
            container[key] = draw(json_values)
        else:
            value = container[key]
            for _ in range(draw(st.integers(min_value=1, max_value=MAX_NESTING))):
                value = [value] if draw(st.booleans()) else {"k": value}
            container[key] = value
    return recipe


recipe_documents = st.one_of(
    st.binary(max_size=600).map(lambda b: ("bytes", b)),
    st.text(max_size=300).map(lambda t: ("text", t)),
    toml_like_text.map(lambda t: ("toml-like", t)),
    json_like_text.map(lambda t: ("json-like", t)),
    json_values.map(lambda v: ("json-value", json.dumps(v))),
    mutated_recipes().map(lambda r: ("mutated-json", json.dumps(r))),
    mutated_recipes().map(lambda r: ("mutated-toml", to_toml(r))),
)

_CELL = st.text(alphabet=st.sampled_from(list("ab1 ,\t\"'\\\r\n{}[]:é\x00")), max_size=12)
_ROLES = st.sampled_from(["system", "user", "assistant", "human", "gpt", "tool", "function", "observation", "x", ""])
_MESSAGE = st.dictionaries(st.sampled_from(["role", "content", "from", "value", "name", "weight", "function_call"]),
                           st.one_of(_ROLES, json_scalars), max_size=4)
_RECORD = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={
        "messages": st.one_of(st.lists(_MESSAGE, max_size=4), json_scalars),
        "conversations": st.one_of(st.lists(_MESSAGE, max_size=4), json_scalars),
        "instruction": json_scalars, "input": json_scalars, "output": json_scalars,
        "user_input": json_scalars, "completion": json_scalars, "score": json_scalars,
        "prompt": json_scalars, "chosen": json_scalars, "rejected": json_scalars, "text": json_scalars,
    }),
)


def _delimited(delimiter: str):
    return st.lists(st.lists(_CELL, min_size=1, max_size=5), max_size=8).map(
        lambda rows: "\n".join(delimiter.join(row) for row in rows))


# (suffix, generated content): the suffix picks the reader under --file-format auto.
data_documents = st.one_of(
    st.tuples(st.just("jsonl"), st.lists(_RECORD.map(json.dumps), max_size=6).map("\n".join)),
    st.tuples(st.just("jsonl"), st.text(max_size=200)),
    st.tuples(st.just("json"), st.lists(_RECORD, max_size=5).map(json.dumps)),
    st.tuples(st.just("json"), json_like_text),
    st.tuples(st.just("csv"), _delimited(",")),
    st.tuples(st.just("tsv"), _delimited("\t")),
    st.tuples(st.sampled_from(["jsonl", "json", "csv", "tsv"]), st.binary(max_size=300)),
)
data_formats = st.sampled_from(sorted(FORMAT_NAMES))
file_formats = st.sampled_from(["auto", "auto", "tsv", "csv", "json", "jsonl"])


def validate_case(directory: Path, case: tuple[str, bytes | str]) -> tuple[int | str, str]:
    kind, content = case
    suffix = "toml" if "toml" in kind or (kind in ("bytes", "text") and len(content) % 2) else "json"
    return outcome(["validate", str(write_case(directory, f"recipe.{suffix}", content))])


def data_check_case(directory: Path, case: tuple[str, bytes | str], fmt: str, file_format: str,
                    columns: bool = False) -> tuple[int | str, str]:
    suffix, content = case
    argv = ["data", "check", str(write_case(directory, f"data.{suffix}", content)), "--format", fmt,
            "--file-format", file_format]
    if columns:
        argv += ["--columns", "a,b,text"]
    return outcome(argv)


# --- the CI slice -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as directory, cached_tokenizer():
        yield Path(directory)


@CI_SETTINGS
@given(data=st.binary(max_size=600), suffix=st.sampled_from(["toml", "json"]))
def test_arbitrary_bytes_as_a_recipe(workdir: Path, data: bytes, suffix: str) -> None:
    code, stderr = outcome(["validate", str(write_case(workdir, f"recipe.{suffix}", data))])
    assert is_clean(code, stderr), stderr


@CI_SETTINGS
@given(case=recipe_documents)
def test_generated_recipe_documents(workdir: Path, case: tuple[str, bytes | str]) -> None:
    code, stderr = validate_case(workdir, case)
    assert is_clean(code, stderr), stderr


@CI_SETTINGS
@given(recipe=mutated_recipes(), as_toml=st.booleans())
def test_mutated_base_recipe(workdir: Path, recipe: dict, as_toml: bool) -> None:
    path = write_case(workdir, "recipe.toml" if as_toml else "recipe.json",
                      to_toml(recipe) if as_toml else json.dumps(recipe))
    code, stderr = outcome(["validate", str(path)])
    assert is_clean(code, stderr), stderr


@CI_SETTINGS
@given(case=data_documents, fmt=data_formats, file_format=file_formats, columns=st.booleans())
def test_generated_data_files(workdir: Path, case: tuple[str, bytes | str], fmt: str, file_format: str,
                              columns: bool) -> None:
    code, stderr = data_check_case(workdir, case, fmt, file_format, columns)
    assert is_clean(code, stderr), stderr


def test_the_base_recipe_validates(workdir: Path) -> None:
    assert outcome(["validate", str(write_case(workdir, "base.json", json.dumps(base_recipe())))])[0] == 0
    assert outcome(["validate", str(write_case(workdir, "base.toml", to_toml(base_recipe())))])[0] == 0


# --- regression cases: inputs that once crashed (exit 2) ----------------------------------------

KNOWN_CRASHES: dict[str, tuple[list[str], str, str]] = {
    # name: (argv tail after the file, file name, content)
    "json_recipe_nested_1000_deep": ([], "recipe.json", "[" * 1000 + "]" * 1000),
    "toml_recipe_nested_600_deep": ([], "recipe.toml", "a = " + "[" * 600 + "]" * 600),
    "json_recipe_600_deep_under_a_key": ([], "recipe.json", '{"zzz": ' + "[" * 600 + "]" * 600 + "}"),
    "json_recipe_lone_surrogate": ([], "recipe.json", '{"name": "\\ud800"}'),
    "json_recipe_4301_digit_integer": ([], "recipe.json", '{"seed": ' + "9" * 4301 + "}"),
    "jsonl_data_nested_5000_deep": (["--format", "columns"], "data.jsonl", "[" * 5000),
    "jsonl_data_4301_digit_integer": (["--format", "columns"], "data.jsonl", "9" * 4301),
    "json_data_nested_5000_deep": (["--format", "columns"], "data.json", "[" * 5000),
    "csv_data_field_over_131072_chars": (["--format", "columns"], "data.csv", "a,b\n" + "x" * 200_000 + ",1\n"),
}


def known_crash_argv(directory: Path, name: str) -> list[str]:
    tail, file_name, content = KNOWN_CRASHES[name]
    path = str(write_case(directory, file_name, content))
    return ["data", "check", path, *tail] if tail else ["validate", path]


@pytest.mark.parametrize("name", KNOWN_CRASHES)
def test_known_crash_regressions(workdir: Path, name: str) -> None:
    code, stderr = outcome(known_crash_argv(workdir, name))
    assert is_clean(code, stderr), stderr
