"""Host memory of a training run, step by step: does it stay flat, and does it stay within the plan?

    .venv/bin/python benchmarks/memory_profile.py [RECIPE] [--steps N] [--stage NAME] [--set KEY=VALUE ...]
                                                  [--env NAME=VALUE ...] [--warmup N] [--out DIR]

Compiles RECIPE (default: the SmolLM2 LoRA chat SFT example) with the first stage cut to `--steps`
optimizer steps and a metrics line after every step, then runs `python -m runtime.train BUILD`
(what launch.sh runs under torchrun, in one process) and, while it trains, reads the process's
current resident set from /proc/PID/statm every 20 ms. Evaluation is not run.

Per step it prints the longest micro-batch (tokens, padded), the process RSS when the step was
logged (`rss_gib`: the runtime's own figure; sampled from outside when the runtime does not
record it), the highest RSS sampled during the step, the runtime's `peak_rss_gib` (ru_maxrss, a
high-water mark) and tokens/s. The last line is one JSON object: the plan's peak, the run's peak
and their ratio, the spread of `rss_gib` after the first `--warmup` steps (max / min - 1, the
flatness figure), tokens/s, wall time and the final loss.

`--env MALLOC_ARENA_MAX=2` and the like pass allocator settings to the training process, to
compare configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.contract.config import load_runtime_config  # noqa: E402
from runtime.core.data import read_training_rows  # noqa: E402
from runtime.core.distributed import Dist  # noqa: E402
from runtime.core.loop import epoch_groups  # noqa: E402

RECIPE = "specs/examples/smollm2-chat-sft.toml"
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
GIB = 1024**3


def compile_build(recipe: str, build: Path, stage: str, steps: int, overrides: list[str]) -> None:
    command = [sys.executable, "-m", "compiler.cli", "compile", recipe, "--out", str(build),
               "--set", f"stages.{stage}.max_steps={steps}", "--set", f"stages.{stage}.log_every_steps=1"]
    for item in overrides:
        command += ["--set", item]
    # Compiler output goes to stderr so that stdout holds the table and the JSON line.
    subprocess.run(command, check=True, cwd=REPO, stdout=sys.stderr)


def longest_batches(build: Path, steps: int) -> list[int]:
    """The padded width of the longest micro-batch of each optimizer step of the first stage."""
    config = load_runtime_config(build)
    stage = config.stages[0]
    rows = read_training_rows(build / config.data[stage.data].train)
    one = Dist(rank=0, world=1, local_rank=0)
    per_epoch = len(epoch_groups(rows, stage, config.seed, 0, one))
    widths = []
    for step in range(steps):
        epoch, group = divmod(step, per_epoch)
        micro_batches = epoch_groups(rows, stage, config.seed, epoch, one)[group]
        widths.append(max(len(rows[j]) for micro in micro_batches for j in micro))
    return widths


class RssSampler(threading.Thread):
    """Current RSS of another process, read from /proc every `period_s`; `take()` returns the
    latest reading and the highest one since the previous `take()`."""

    def __init__(self, pid: int, period_s: float = 0.02):
        super().__init__(daemon=True)
        self.path, self.period_s = f"/proc/{pid}/statm", period_s
        self.now_gib = self.peak_gib = 0.0
        self.lock = threading.Lock()

    def run(self) -> None:
        while True:
            try:
                with open(self.path) as f:
                    resident = int(f.read().split()[1]) * PAGE_BYTES / GIB
            except (OSError, IndexError, ValueError):
                return  # the process is gone
            with self.lock:
                self.now_gib, self.peak_gib = resident, max(self.peak_gib, resident)
            time.sleep(self.period_s)

    def take(self) -> tuple[float, float]:
        with self.lock:
            now, peak = self.now_gib, self.peak_gib
            self.peak_gib = now
        return now, peak


def train(build: Path, env: dict[str, str], widths: list[int]) -> tuple[list[dict], float]:
    """Run the training and print one line per step; returns the steps' figures and the wall time."""
    metrics_path = build / "metrics.jsonl"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "runtime.train", str(build)], cwd=REPO,
                               env={**os.environ, **env, "PYTHONPATH": str(REPO)}, stdout=sys.stderr)
    sampler = RssSampler(process.pid)
    sampler.start()
    steps: list[dict] = []
    seen = 0
    print(f"{'step':>5} {'longest':>8} {'rss_gib':>8} {'step_peak':>9} {'peak_rss':>8} {'tok/s':>7}", flush=True)

    def read_new_lines() -> None:
        nonlocal seen
        if not metrics_path.exists():
            return
        lines = metrics_path.read_text().splitlines()
        for line in lines[seen:]:
            if not line.endswith("}"):
                break  # written but not yet complete
            record = json.loads(line)
            now, peak = sampler.take()
            step = {"step": record["step"], "longest": widths[record["step"] - 1],
                    "rss_gib": record.get("rss_gib", round(now, 3)), "sampled_rss_gib": round(now, 3),
                    "step_peak_gib": round(peak, 3), "peak_rss_gib": record.get("peak_rss_gib"),
                    "tokens_per_s": record["tokens_per_s"], "loss": record["loss"]}
            steps.append(step)
            seen += 1
            print(f"{step['step']:>5} {step['longest']:>8} {step['rss_gib']:>8.3f} {step['step_peak_gib']:>9.3f} "
                  f"{step['peak_rss_gib'] or 0:>8.3f} {step['tokens_per_s']:>7.1f}", flush=True)

    while process.poll() is None:
        read_new_lines()
        time.sleep(0.05)
    read_new_lines()
    if process.returncode != 0:
        raise SystemExit(f"training failed with exit code {process.returncode}")
    return steps, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", default=RECIPE)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--stage", default="sft", help="name of the recipe's first stage")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the training process (e.g. MALLOC_ARENA_MAX=2)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the flatness figure")
    parser.add_argument("--out", type=Path, help="build directory (default: a temporary one)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="memory-profile-") as tmp:
        build = args.out or Path(tmp) / "build"
        compile_build(args.recipe, build, args.stage, args.steps, args.overrides)
        widths = longest_batches(build, args.steps)
        env = dict(item.split("=", 1) for item in args.env)
        steps, wall_s = train(build, env, widths)
        plan = json.loads((build / "plan.json").read_text())
        report = json.loads((build / "train_report.json").read_text())["stages"][0]
    plan_peak = plan["stages"][0]["memory"]["peak_gib"]
    settled = [s["rss_gib"] for s in steps[args.warmup:]] or [s["rss_gib"] for s in steps]
    longest = max(steps, key=lambda s: s["longest"])
    summary = {
        "recipe": args.recipe, "steps": args.steps, "overrides": args.overrides, "env": env,
        "plan_peak_gib": plan_peak, "peak_rss_gib": report["peak_rss_gib"],
        "peak_over_plan": round(report["peak_rss_gib"] / plan_peak, 3),
        "sampled_peak_gib": max(s["step_peak_gib"] for s in steps),
        "rss_gib_first": steps[0]["rss_gib"], "rss_gib_last": steps[-1]["rss_gib"],
        "rss_gib_settled_min": min(settled), "rss_gib_settled_max": max(settled),
        "rss_settled_spread": round(max(settled) / min(settled) - 1, 3),
        "longest_batch": {"step": longest["step"], "tokens": longest["longest"],
                          "step_peak_gib": longest["step_peak_gib"]},
        "tokens_per_s": report["tokens_per_s"], "train_wall_s": report["wall_s"], "process_wall_s": round(wall_s, 1),
        "final_loss": report["final_loss"],
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
