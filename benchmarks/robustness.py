"""Robustness: generated recipe and data files through `recipe validate` and `recipe data check`,
plus the corpus of template sandbox-escape attempts through `recipe compile`.

    .venv/bin/python benchmarks/robustness.py [--cases N] [--out DIR]

The generators are those of tests/test_fuzz.py (CI runs a small slice of them); here they run for
N cases in all (default 10,000), split evenly over four properties, in-process. Each case ends in
ok (exit 0), a diagnostic (exit 1) or a failure (exit 2, an exception, or a traceback on stderr);
the first failures are written to --out. The regression inputs of tests/test_fuzz.py (inputs
that once crashed) run too and count as cases. The last line is one JSON object:
{"cases": N, "ok": a, "diagnostics": b, "failures": c, "escape_attempts": k, "escapes": 0}.
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

from tests import test_fuzz as fuzz  # noqa: E402
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
    seconds = time.perf_counter() - start

    props = sorted({p for p, _ in tally.counts}, key=lambda p: (p.startswith("known"), p))
    print(f"{'property':32} {'cases':>7} {'ok':>7} {'diag':>7} {'fail':>5}")
    for prop in props:
        print(f"{prop:32} {tally.total(prop=prop):7d} {tally.total('ok', prop):7d} "
              f"{tally.total('diagnostics', prop):7d} {tally.total('failures', prop):5d}")
    print(f"{'total':32} {tally.total():7d} {tally.total('ok'):7d} {tally.total('diagnostics'):7d} "
          f"{tally.total('failures'):5d}   ({fuzz_seconds:.1f} s)")
    print(f"template escape attempts: {n_attempts}, escapes: {len(escapes)}, refused with exit 2: "
          f"{len(escape_crashes)} ({', '.join(escape_crashes) or 'none'}); {seconds:.1f} s in all")
    for line in escapes:
        print(f"  ESCAPE: {line}")
    print(json.dumps({"cases": tally.total(), "ok": tally.total("ok"), "diagnostics": tally.total("diagnostics"),
                      "failures": tally.total("failures"), "escape_attempts": n_attempts, "escapes": len(escapes)}))
    return 1 if tally.total("failures") or escapes else 0


if __name__ == "__main__":
    sys.exit(main())
