"""Robustness: generated recipe and data files through `recipe validate` and `recipe data check`,
plus the corpus of template sandbox-escape attempts through `recipe compile`, `recipe compile`
killed at every point of writing a build, and bad rows spread through data files.

    .venv/bin/python benchmarks/robustness.py [--cases N] [--out DIR]

The generators are those of tests/test_fuzz.py (CI runs a small slice of them); here they run for
N cases in all (default 10,000), split evenly over four properties, in-process. Each case ends in
ok (exit 0), a diagnostic (exit 1) or a failure (exit 2, an exception, or a traceback on stderr);
the first failures are written to --out. The regression inputs of tests/test_fuzz.py (inputs
that once crashed) run too and count as cases. The interruption and bad-data checks are those of
tests/test_interrupted_compile.py and tests/test_bad_data_scale.py (benchmarks/bad_data_scale.py
runs the latter at 100,000 rows). The last line is one JSON object:
{"cases": N, "ok": a, "diagnostics": b, "failures": c, "escape_attempts": k, "escapes": 0,
 "killed_compiles": m, "killed_compiles_failed": 0, "bad_rows": r, "bad_rows_missed": 0}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests import test_bad_data_scale as bad_data  # noqa: E402
from tests import test_fuzz as fuzz  # noqa: E402
from tests import test_interrupted_compile as interrupted  # noqa: E402
from tests import test_template_escape as escape  # noqa: E402

KEEP_FAILURES = 20


class Tally:
    def __init__(self, out: Path | None):
        self.counts: Counter[tuple[str, str]] = Counter()
        self.out = out
        self.saved = 0

    def record(self, prop: str, code: int | str, stderr: str, case: object) -> None:
        if fuzz.is_clean(code, stderr):
            self.counts[prop, "ok" if code == 0 else "diagnostics"] += 1
            return
        self.counts[prop, "failures"] += 1
        if self.saved < KEEP_FAILURES:
            self.saved += 1
            text = f"property: {prop}\nexit: {code}\ninput: {case!r}\n\n{stderr}"
            if self.out is not None:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / f"failure-{self.saved:02d}.txt").write_text(text, encoding="utf-8", errors="replace")
            else:
                print(text[:2000], file=sys.stderr)

    def total(self, column: str | None = None, prop: str | None = None) -> int:
        return sum(n for (p, c), n in self.counts.items() if (column in (None, c)) and (prop in (None, p)))


def run_properties(n: int, workdir: Path, tally: Tally) -> None:
    """The four properties of tests/test_fuzz.py, about n // 4 generated cases each."""
    each = settings(max_examples=max(1, n // 4), deadline=None, database=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck))

    @each
    @given(data=st.binary(max_size=600), suffix=st.sampled_from(["toml", "json"]))
    def arbitrary_bytes(data: bytes, suffix: str) -> None:
        code, stderr = fuzz.outcome(["validate", str(fuzz.write_case(workdir, f"recipe.{suffix}", data))])
        tally.record("recipe: arbitrary bytes", code, stderr, (suffix, data))

    @each
    @given(case=fuzz.recipe_documents)
    def documents(case) -> None:
        tally.record("recipe: generated documents", *fuzz.validate_case(workdir, case), case)

    @each
    @given(recipe=fuzz.mutated_recipes(), as_toml=st.booleans())
    def mutated(recipe: dict, as_toml: bool) -> None:
        text = fuzz.to_toml(recipe) if as_toml else json.dumps(recipe)
        path = fuzz.write_case(workdir, "recipe.toml" if as_toml else "recipe.json", text)
        tally.record("recipe: mutated base recipe", *fuzz.outcome(["validate", str(path)]), text)

    @each
    @given(case=fuzz.data_documents, fmt=fuzz.data_formats, file_format=fuzz.file_formats, columns=st.booleans())
    def data_files(case, fmt: str, file_format: str, columns: bool) -> None:
        code, stderr = fuzz.data_check_case(workdir, case, fmt, file_format, columns)
        tally.record("data check: generated files", code, stderr, (case, fmt, file_format, columns))

    for prop in (arbitrary_bytes, documents, mutated, data_files):
        prop()


def run_known_crashes(workdir: Path, tally: Tally) -> None:
    for name in fuzz.KNOWN_CRASHES:
        code, stderr = fuzz.outcome(fuzz.known_crash_argv(workdir, name))
        tally.record("regressions (once crashed)", code, stderr, name)


def run_escapes(root: Path) -> tuple[int, list[str], list[str]]:
    """(attempts, escapes, exit-2 refusals) of the template corpus."""
    escapes, crashes = [], []
    for name, template in escape.ESCAPE_ATTEMPTS.items():
        workdir = root / name
        workdir.mkdir()
        code, _, seconds, out = escape.compile_attempt(template, workdir)
        ran = (workdir / escape.SENTINEL).exists() or (REPO / escape.SENTINEL).exists()
        if code == -1 or ran or escape.leaked(out):
            escapes.append(f"{name} (exit {code}, {seconds:.1f} s, command ran: {ran}, leaks: {escape.leaked(out)})")
        elif code not in (0, 1):
            crashes.append(name)
    return len(escape.ESCAPE_ATTEMPTS), escapes, crashes


def run_killed_compiles(root: Path) -> tuple[int, list[str]]:
    """`recipe compile` killed at each crash point, over a previous build (with run outputs beside
    it) and into an empty folder: (cases, what went wrong). Each must leave a whole build, the old
    one or the new one, or a folder refused as incomplete; the next compile must succeed."""
    import contextlib
    import io
    import os
    import shutil
    import subprocess

    from compiler.cli.running import check_build
    from compiler.diagnostics import RecipeError
    from runtime.contract.files import CRASH_AT_ENV

    def compile_into(recipe: Path, out: Path, crash_at: str | None = None) -> tuple[int, str]:
        env = dict(os.environ, **({CRASH_AT_ENV: crash_at} if crash_at else {}))
        result = subprocess.run([sys.executable, "-m", "compiler.cli", "compile", str(recipe), "--out", str(out)],
                                cwd=root, env=env, capture_output=True, text=True)
        return result.returncode, result.stderr[-300:]

    v1, v2 = interrupted._recipes(root)
    for recipe, out in ((v1, root / "v1"), (v2, root / "v2")):
        code, stderr = compile_into(recipe, out)
        if code != 0:
            raise RuntimeError(f"compiling {recipe.name} failed: {stderr}")
    for rel, content in interrupted.RUN_OUTPUTS.items():
        (root / "v1" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "v1" / rel).write_bytes(content)
    before, after = interrupted._compiled(root / "v1"), interrupted._compiled(root / "v2")
    problems, cases = [], 0
    for point in interrupted.CRASH_POINTS:
        for previous in (True, False):
            cases += 1
            case = f"{point}, {'over a previous build' if previous else 'into an empty folder'}"
            out, probe = root / f"case-{cases}", root / f"probe-{cases}"
            if previous:
                shutil.copytree(root / "v1", out)
            code, stderr = compile_into(v2, out, point)
            if code != -9:
                problems.append(f"{case}: compile was not killed (exit {code}): {stderr}")
                continue
            probe.mkdir()  # (a compile killed before it wrote anything leaves no folder at all)
            if out.exists():
                shutil.copytree(out, probe, dirs_exist_ok=True)
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # its notes on what it restored
                    check_build(probe)
                state = interrupted._compiled(probe)
                whole = state == after or (previous and state == before)
            except RecipeError as exc:
                whole = not previous and ("is incomplete" in str(exc) or not out.exists())
            again, stderr = compile_into(v2, out)
            kept = not previous or interrupted._run_outputs(out) == interrupted.RUN_OUTPUTS
            if not whole or again != 0 or interrupted._compiled(out) != after or not kept:
                problems.append(f"{case}: whole {whole}, recompile exit {again}, run outputs kept {kept}: {stderr}")
    return cases, problems


def run_bad_data(root: Path) -> tuple[int, int]:
    """(bad rows, bad rows not reported at their line with their categories) over the three files."""
    bad = missed = 0
    for spec in bad_data.FILES:
        written = bad_data.write_file(spec, root, bad_data.ROWS, bad_data.PER_KIND)
        errors, _, kept = bad_data.reported_lines(spec, written)
        bad += len(written.expected)
        missed += sum(errors.get(line) != cats for line, cats in written.expected.items())
        missed += written.rows - len(kept) - len(errors)  # rows neither kept nor reported
    return bad, missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="generated cases in all (default 10,000)")
    parser.add_argument("--out", type=Path, help="folder for the first failing inputs (default: print them)")
    args = parser.parse_args()

    tally = Tally(args.out)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory, fuzz.cached_tokenizer():
        run_properties(args.cases, Path(directory), tally)
        run_known_crashes(Path(directory), tally)
    fuzz_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as directory:
        n_attempts, escapes, escape_crashes = run_escapes(Path(directory))
    escape_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as directory:
        n_killed, killed_problems = run_killed_compiles(Path(directory))
    with tempfile.TemporaryDirectory() as directory:
        n_bad, bad_missed = run_bad_data(Path(directory))
    seconds = time.perf_counter() - start

    props = sorted({p for p, _ in tally.counts}, key=lambda p: (p.startswith("known"), p))
    print(f"{'property':32} {'cases':>7} {'ok':>7} {'diag':>7} {'fail':>5}")
    for prop in props:
        print(f"{prop:32} {tally.total(prop=prop):7d} {tally.total('ok', prop):7d} "
              f"{tally.total('diagnostics', prop):7d} {tally.total('failures', prop):5d}")
    print(f"{'total':32} {tally.total():7d} {tally.total('ok'):7d} {tally.total('diagnostics'):7d} "
          f"{tally.total('failures'):5d}   ({fuzz_seconds:.1f} s)")
    print(f"template escape attempts: {n_attempts}, escapes: {len(escapes)}, refused with exit 2: "
          f"{len(escape_crashes)} ({', '.join(escape_crashes) or 'none'}); {escape_seconds:.1f} s")
    for line in escapes:
        print(f"  ESCAPE: {line}")
    print(f"compile killed at {len(interrupted.CRASH_POINTS)} points, over a build and into an empty folder: "
          f"{n_killed} cases, {n_killed - len(killed_problems)} left a whole build or a clean refusal and recompiled")
    for line in killed_problems:
        print(f"  KILLED COMPILE: {line}")
    print(f"bad rows in {len(bad_data.FILES)} files of {bad_data.ROWS:,} rows: {n_bad:,}, not reported at their "
          f"line: {bad_missed}; {seconds:.1f} s in all")
    print(json.dumps({"cases": tally.total(), "ok": tally.total("ok"), "diagnostics": tally.total("diagnostics"),
                      "failures": tally.total("failures"), "escape_attempts": n_attempts, "escapes": len(escapes),
                      "killed_compiles": n_killed, "killed_compiles_failed": len(killed_problems),
                      "bad_rows": n_bad, "bad_rows_missed": bad_missed}))
    return 1 if tally.total("failures") or escapes or killed_problems or bad_missed else 0


if __name__ == "__main__":
    sys.exit(main())
