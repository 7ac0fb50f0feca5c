"""Prompt templates cannot escape the sandbox: each attempt below, used as the prompt of an
otherwise valid recipe, is either refused with a clean diagnostic (exit 1) or compiles to output
that holds nothing from outside the sandbox, within a bounded time, and runs nothing.

Every compile runs in a child process under a 2 GiB address-space limit and a time limit, so an
attempt that is not bounded fails its test instead of taking the machine down.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, base_recipe, write_json_recipe

TIME_LIMIT_S = 60
MEMORY_LIMIT_BYTES = 2 * 1024**3
SENTINEL = "ESCAPE_SENTINEL"

# Each prompt also reads {{ text }}, so the recipe passes every other check and the attempt itself
# is what the compiler has to deal with.
ESCAPE_ATTEMPTS: dict[str, str] = {
    "mro_subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "tuple_base_subclasses": "{{ ().__class__.__base__.__subclasses__() }}",
    "cycler_globals_os": "{{ cycler.__init__.__globals__.os }}",
    "joiner_globals": "{{ joiner.__init__.__globals__ }}",
    "namespace_globals": "{{ namespace.__init__.__globals__ }}",
    "template_reference_context": "{{ self._TemplateReference__context }}",
    "self_dict": "{{ self.__dict__ }}",
    "lipsum_globals": "{{ lipsum.__globals__ }}",
    "lipsum_builtins_import": "{{ lipsum.__globals__['__builtins__']['__import__']('os') }}",
    "config_items": "{{ config.items() }}",
    "request": "{{ request }}",
    "percent_format_class": "{{ '%s' % ().__class__ }}",
    "str_format_class": "{{ '{0.__class__}'.format(text) }}",
    "str_format_globals": "{{ '{0.__init__.__globals__}'.format(text) }}",
    "format_map_class": "{{ '{x.__class__.__mro__}'.format_map({'x': text}) }}",
    "field_init_globals": "{{ text.__class__.__init__.__globals__ }}",
    "attr_filter_class": "{{ text|attr('__class__') }}",
    "attr_filter_init": "{{ text|attr('__init__') }}",
    "attr_filter_chain": "{{ ((text|attr('__class__'))|attr('__mro__'))[1]|attr('__subclasses__') }}",
    "getitem_dunder": "{{ text['__class__'] }}",
    "func_code": "{{ range.__code__ }}",
    "import_os": "{% import 'os' as os %}{{ os }}",
    "include_passwd": "{% include '/etc/passwd' %}",
    "extends_passwd": "{% extends '/etc/passwd' %}",
    "from_import": "{% from 'os' import system %}{{ system('id') }}",
    "set_mutation": "{% set d = {} %}{{ d.update({'a': 1}) }}",
    "loop_billion": "{% for i in range(10**9) %}x{% endfor %}",
    "range_list_bomb": "{{ range(10**10)|list }}",
    "append_loop": "{% set a = [] %}{% for i in range(99999999) %}{{ a.append(i) }}{% endfor %}",
    "power_bomb": "{{ 10**10**10 }}",
    "repeat_bomb": "{{ 'x' * 10**9 }}",
    "list_repeat_bomb": "{{ [1, 2] * 10**9 }}",
    "power_9_9_9": "{{ 9 ** 9 ** 9 }}",
    "sentinel_os_system": "{{ cycler.__init__.__globals__.os.system('touch " + SENTINEL + "') }}",
    "sentinel_popen": "{{ lipsum.__globals__.os.popen('touch " + SENTINEL + "').read() }}",
    "sentinel_subclass_walk": (
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
        "{{ c(['touch', '" + SENTINEL + "']) }}{% endif %}{% endfor %}"
    ),
}

# Text that only an escape could put into a build.
LEAKS = ("root:", "<class 'os", "<module 'os", "subprocess", "__builtins__", "<function", "<built-in",
         "_TemplateReference", "/etc/passwd", "Popen", "uid=")


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def compile_attempt(template: str, workdir: Path) -> tuple[int, str, float, Path]:
    """Compile the base recipe with `template` in its prompt, in a child process under the limits
    above (run with `workdir` as its current directory); the exit code, stderr, seconds and the
    build directory. The exit code is -1 when the time limit was reached."""
    recipe = base_recipe(template={"prompt": "Input: {{ text }}\n" + template + "\nOutput:"})
    path = write_json_recipe(workdir, recipe)
    out = workdir / "build"
    start = time.perf_counter()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "compiler.cli", "compile", str(path), "--out", str(out)],
            cwd=workdir, env={"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=TIME_LIMIT_S, preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired:
        return -1, "", time.perf_counter() - start, out
    return result.returncode, result.stderr, time.perf_counter() - start, out


def build_text(out: Path) -> dict[str, str]:
    """Every file of a build directory as text, with the tokenized data rows decoded back to text
    (the tokenizer's vocabulary itself is left out: it holds every short string there is)."""
    if not out.is_dir():
        return {}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    texts = {}
    for file in sorted(out.rglob("*")):
        if not file.is_file() or file.name == "tokenizer.json":
            continue
        text = file.read_text(errors="replace")
        if file.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines()]
            text = "\n".join(tokenizer.decode(row["prompt"]) + tokenizer.decode(row["completion"]) for row in rows)
        texts[file.relative_to(out).as_posix()] = text
    return texts


def leaked(out: Path) -> list[str]:
    """The leak markers found in a build directory."""
    return [f"{marker!r} in {name}" for name, text in build_text(out).items() for marker in LEAKS if marker in text]


@pytest.fixture(scope="module")
def attempts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, float, Path, Path]]:
    """Each attempt compiled once: exit code, stderr, seconds, build directory, working directory."""
    results = {}
    for name, template in ESCAPE_ATTEMPTS.items():
        workdir = tmp_path_factory.mktemp(name)
        results[name] = (*compile_attempt(template, workdir), workdir)
    return results


@pytest.mark.parametrize("name", ESCAPE_ATTEMPTS)
def test_escape_attempt_is_bounded_and_runs_nothing(attempts, name: str) -> None:
    code, stderr, seconds, out, workdir = attempts[name]
    assert code != -1, f"not bounded: still compiling after {TIME_LIMIT_S} s"
    assert seconds < TIME_LIMIT_S
    assert leaked(out) == []
    assert not (workdir / SENTINEL).exists(), "the template ran a command"
    assert not (REPO / SENTINEL).exists(), "the template ran a command"


@pytest.mark.parametrize("name", ESCAPE_ATTEMPTS)
def test_escape_attempt_is_refused_cleanly_or_harmless(attempts, name: str) -> None:
    code, stderr = attempts[name][:2]
    assert code in (0, 1), f"exit {code}:\n{stderr}"
    assert "Traceback" not in stderr
    if code == 1:
        assert stderr.startswith("error:"), stderr


def test_a_plain_template_still_compiles(tmp_path: Path) -> None:
    code, stderr, _, out = compile_attempt("{{ text|upper }} {{ 'x' * 3 }}", tmp_path)
    assert code == 0, stderr
    assert "I LOVE THIS SO MUCH & MORE xxx" in build_text(out)["data/tweets/train.jsonl"]
