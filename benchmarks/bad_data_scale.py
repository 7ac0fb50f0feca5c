"""Bad data at scale: `recipe data check` on files of 100,000 rows with a few hundred bad rows of
every category the data checks know, spread at random lines among the good ones.

    .venv/bin/python benchmarks/bad_data_scale.py [--rows N] [--per-kind K] [--target-s S]

Three files cover the categories (each needs its own record shape): an openai-chat JSONL file
(the chat categories of OpenAI's checker, invalid_json, data_type and the two warnings), a scored
JSONL file (missing_field, wrong_type, not_a_number, empty_field) and a scored TSV file
(wrong_field_count, not_a_number). For each it prints the counts per category expected against
those `recipe data check --json` reports, whether every bad row was reported at its line with its
categories (through compiler.data.read.read_dataset, the reader the check and `recipe compile`
share), whether any row went missing, how many line numbers the command itself lists, and the
wall time against the target (default 10 s per 100,000 rows: the throughput README sets for
measuring templated rows, benchmarks/token_profile.py). A last probe checks that valid JSON rows
holding U+2028 / U+0085 inside a string are read as one row each. The last line is one JSON
object; the exit status is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.test_bad_data_scale import FILES, DataFile, data_check_argv, reported_lines, write_file  # noqa: E402


def _cli(argv: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """(result, wall seconds, CPU seconds) of one `recipe` command in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "compiler.cli", *argv], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return result, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def check_file(spec: DataFile, folder: Path, rows: int, per_kind: int, target_s: float) -> dict:
    written = write_file(spec, folder, rows, per_kind)
    result, wall_s, cpu_s = _cli(data_check_argv(spec, written))
    report = json.loads(result.stdout) if result.stdout.startswith("{") else {}
    errors, warnings, kept = reported_lines(spec, written)
    text_result, _, _ = _cli([a for a in data_check_argv(spec, written) if a != "--json"])
    listed = {int(line.split()[1].rstrip(":")) for line in text_result.stdout.splitlines()
              if line.startswith("  line ")}

    expected_errors, expected_warnings = written.counts("errors"), written.counts("warnings")
    reported_warnings = {k: v for k, v in report.get("warnings", {}).items() if k != "over_token_limit"}
    at_line = sum(errors.get(line) == categories for line, categories in written.expected.items())
    dropped = rows - len(kept) - len(errors)
    print(f"\n{written.path.name} ({spec.format}{', --columns ' + ','.join(spec.columns) if spec.columns else ''}): "
          f"{rows:,} rows, {len(written.expected):,} bad, {len(written.warnings):,} with warnings; "
          f"exit {result.returncode}")
    print(f"  {'category':44} {'expected':>9} {'reported':>9}")
    for severity, expected, got in (("error", expected_errors, report.get("errors", {})),
                                    ("warning", expected_warnings, reported_warnings)):
        for category in sorted(set(expected) | set(got)):
            mark = "ok" if expected.get(category, 0) == got.get(category, 0) else "MISMATCH"
            print(f"  {category + ' (' + severity + ')':44} {expected.get(category, 0):9,} {got.get(category, 0):9,}  "
                  f"{mark}")
    print(f"  bad rows reported at their line with their categories: {at_line:,} of {len(written.expected):,}; "
          f"lines reported that are not bad: {len(set(errors) - set(written.expected))}")
    print(f"  rows kept {len(kept):,} + rows refused {len(errors):,} = {len(kept) + len(errors):,} of {rows:,} "
          f"({'nothing dropped silently' if dropped == 0 else f'{dropped:,} DROPPED SILENTLY'}); "
          f"n_examples {report.get('n_examples', 0):,}")
    print(f"  line numbers `recipe data check` prints itself: {len(listed & set(written.expected)):,} of "
          f"{len(written.expected):,} (the --json output has counts only)")
    print(f"  wall {wall_s:.1f} s (CPU {cpu_s:.1f} s), target < {target_s:.0f} s: "
          f"{'ok' if wall_s < target_s else 'OVER'}")
    return {
        "rows": rows, "bad_rows": len(written.expected), "bad_rows_at_line": at_line,
        "counts_match": report.get("errors") == expected_errors and reported_warnings == expected_warnings,
        "extra_lines": len(set(errors) - set(written.expected)), "dropped": dropped,
        "n_examples_ok": report.get("n_examples") == rows, "listed_by_cli": len(listed & set(written.expected)),
        "wall_s": wall_s, "cpu_s": cpu_s,
    }


def separator_probe(folder: Path) -> bool:
    """Valid rows whose text holds U+2028 LINE SEPARATOR or U+0085 NEXT LINE (legal, unescaped,
    inside JSON strings; common in text copied from the web) must each stay one row."""
    spec = FILES[0]
    path = folder / "separators.jsonl"
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": f"a{sep}b"},
                          {"role": "assistant", "content": "c"}]} for sep in ("\u2028", "\u0085", "\u2029")]
    rows.append({"messages": [{"role": "robot", "content": "x"}, {"role": "user", "content": "u"},
                              {"role": "assistant", "content": "c"}]})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    from tests.test_bad_data_scale import Written

    errors, _, kept = reported_lines(spec, Written(path, len(rows), {}, {}))
    ok = kept == [1, 2, 3] and errors == {4: ("unrecognized_role",)}
    print(f"\nvalid JSONL rows with U+2028 / U+0085 / U+2029 inside a string: {'ok' if ok else 'FAIL'} "
          f"(rows kept at lines {kept}; errors {errors or 'none'}; expected rows 1-3 kept, line 4 unrecognized_role)")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows per file (default 100,000)")
    parser.add_argument("--per-kind", type=int, default=300, help="bad rows of each kind per file (default 300)")
    parser.add_argument("--target-s", type=float, help="wall-time target per file (default 10 s per 100,000 rows)")
    args = parser.parse_args()
    target_s = args.target_s or 10.0 * args.rows / 100_000

    print(f"recipe data check on {len(FILES)} files of {args.rows:,} rows, {args.per_kind} bad rows of each kind")
    with tempfile.TemporaryDirectory() as directory:
        results = [check_file(spec, Path(directory), args.rows, args.per_kind, target_s) for spec in FILES]
        separators_ok = separator_probe(Path(directory))
    summary = {
        "rows": sum(r["rows"] for r in results),
        "bad_rows": sum(r["bad_rows"] for r in results),
        "bad_rows_reported_at_line": sum(r["bad_rows_at_line"] for r in results),
        "counts_match": all(r["counts_match"] for r in results),
        "silently_dropped": sum(r["dropped"] for r in results) + sum(not r["n_examples_ok"] for r in results),
        "line_numbers_listed_by_cli": sum(r["listed_by_cli"] for r in results),
        "max_wall_s": round(max(r["wall_s"] for r in results), 2),
        "target_s": target_s,
        "separator_rows_ok": separators_ok,
    }
    print(json.dumps(summary))
    failed = (summary["bad_rows_reported_at_line"] != summary["bad_rows"] or not summary["counts_match"]
              or summary["silently_dropped"] or summary["max_wall_s"] >= target_s or not separators_ok
              or any(r["extra_lines"] for r in results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
