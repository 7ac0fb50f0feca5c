"""How true the plan is on this machine: compile and train the demo (tweet-sentiment) and the
SmolLM2 LoRA chat example, and compare the run report's actual wall time, tokens/s and peak memory
with what the plan predicted.

    .venv/bin/python benchmarks/plan_fidelity.py [--steps N] [--set KEY=VALUE ...] [--case NAME ...]

`--steps N` trains N steps of each case (train.max_steps; the plan is compiled for them too);
`--set` is passed to every compile. The plan's peak is that of the longest example's batch; a
short run may not meet it (the SmolLM2 example's first 4 steps peak at a third of it), so memory
is compared on full runs. Training is `python -m runtime.train BUILD` (no eval). The
target is every ratio (actual / planned) within 0.8-1.25 on idle cores; on a shared machine the
time ratios move with the load, and the hardware file's figures should come from
`recipe hardware probe` run under the same conditions.

Prints a table per case and, last, one JSON line:
{"cases": [{"name", "time_ratio", "tokens_per_s_ratio", "memory_ratio", ...}]}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = {
    "tweet-sentiment": "specs/examples/tweet-sentiment.toml",
    "smollm2-chat-sft": "specs/examples/smollm2-chat-sft.toml",
}


def compile_case(recipe: str, build: Path, steps: int | None, sets: list[str]) -> None:
    overrides = [f"--set={s}" for s in sets]
    if steps is not None:
        overrides += [f"--set=train.max_steps={steps}", "--set=train.epochs=none"]
    subprocess.run([sys.executable, "-m", "compiler.cli", "compile", recipe, "--out", str(build), *overrides],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def train_case(build: Path) -> float:
    """`python -m runtime.train BUILD` as launch.sh runs it on one process; its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=REPO, check=True,
                   env=dict(os.environ, PYTHONUNBUFFERED="1"), stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def _ratio(entry: dict) -> float | None:
    planned, actual = entry.get("planned"), entry.get("actual")
    return round(actual / planned, 3) if planned and actual is not None else None


def case_figures(name: str, build: Path, process_s: float) -> dict:
    """Planned and actual figures of the case's (single) stage from its run report."""
    stage = json.loads((build / "run_report.json").read_text())["stages"][0]
    wall, rate, peak = stage["wall_s"], stage["tokens_per_s"], stage["peak_memory_gib"]
    probe = stage.get("probe_peak_gib") or {}
    plan = json.loads((build / "plan.json").read_text())["stages"][0]
    return {
        "name": name, "steps": stage["steps"]["actual"],
        "planned_wall_s": wall["planned"], "actual_wall_s": wall["actual"], "time_ratio": _ratio(wall),
        "planned_overhead_s": plan["compute"].get("overhead_s"),
        "process_wall_s": round(process_s, 1),
        "planned_tokens_per_s": rate["planned"], "actual_tokens_per_s": rate["actual"],
        "tokens_per_s_ratio": _ratio(rate),
        "planned_peak_gib": peak["planned"], "actual_peak_gib": peak["actual"], "memory_basis": peak["measured"],
        "memory_ratio": _ratio(peak), "probe_peak_gib": probe.get("actual"),
    }


def print_case(figures: dict) -> None:
    print(f"\n{figures['name']} ({figures['steps']} steps; runtime.train process {figures['process_wall_s']} s)")
    print(f"{'':24}{'planned':>12}{'actual':>12}{'ratio':>8}")
    for label, key, ratio in (("wall time, s", "wall_s", "time_ratio"), ("tokens/s", "tokens_per_s",
                              "tokens_per_s_ratio"), ("peak memory, GiB", "peak_gib", "memory_ratio")):
        print(f"{label:24}{figures['planned_' + key]!s:>12}{figures['actual_' + key]!s:>12}{figures[ratio]!s:>8}")
    print(f"(planned per-step overheads {figures['planned_overhead_s']} s of the wall time; memory as "
          f"{figures['memory_basis']}; longest micro-batch probe {figures['probe_peak_gib']} GiB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, help="train this many steps of each case (train.max_steps)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every compile")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases (default: both)")
    args = parser.parse_args()
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.case or list(CASES):
            build = Path(tmp) / name
            try:
                compile_case(CASES[name], build, args.steps, args.set)
                figures = case_figures(name, build, train_case(build))
            except subprocess.CalledProcessError as exc:
                print(f"\n{name}: {' '.join(map(str, exc.cmd[1:4]))} failed with status {exc.returncode}")
                cases.append({"name": name, "error": f"exit status {exc.returncode}"})
                continue
            print_case(figures)
            cases.append(figures)
    print(json.dumps({"cases": cases}, sort_keys=True))
    return 0 if all("error" not in c for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
