"""Measure the walking skeleton on the tweet-sentiment recipe: validate and compile time, padding
saved by length grouping, training throughput and held-out accuracy.

    .venv/bin/python benchmarks/compile_and_train.py [--recipe PATH] [--skip-run]

Prints one line per figure and, last, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.contract.artifacts import read_eval_report, read_train_report  # noqa: E402
from runtime.contract.config import load_runtime_config  # noqa: E402
from runtime.contract.layout import EVAL_JSON, TRAIN_REPORT_FILE  # noqa: E402
from runtime.core.data import length_grouped_batches, read_examples  # noqa: E402


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _padding_fraction(lengths: list[int], batches: list[list[int]], pad_to: int | None) -> float:
    real = sum(lengths)
    padded = sum((pad_to or max(lengths[i] for i in b)) * len(b) for b in batches)
    return 1 - real / padded


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="specs/examples/tweet-sentiment.toml")
    parser.add_argument("--skip-run", action="store_true", help="measure compile only")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "compiler.cli"]
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp) / "build"
        figures["validate_s"] = round(_timed(cli + ["validate", args.recipe]), 3)
        _timed(cli + ["compile", args.recipe, "--out", str(build)])  # warm the asset and tokenizer cache
        figures["compile_s"] = round(_timed(cli + ["compile", args.recipe, "--out", str(build)]), 2)

        config = load_runtime_config(build)
        stage = config.stages[0]
        lengths = [len(e) for e in read_examples(build / config.data[stage.data].train)]
        batches = length_grouped_batches(lengths, stage.micro_batch_size, config.seed)
        plain = length_grouped_batches(lengths, stage.micro_batch_size, config.seed, group=False)
        figures["padding_fraction_pad_to_max"] = round(_padding_fraction(lengths, plain, config.model.n_positions), 4)
        figures["padding_fraction_per_batch_max"] = round(_padding_fraction(lengths, plain, None), 4)
        figures["padding_fraction_length_grouped"] = round(_padding_fraction(lengths, batches, None), 4)

        if not args.skip_run:
            figures["run_s"] = round(_timed(cli + ["run", str(build)]), 1)
            report = read_train_report(build / TRAIN_REPORT_FILE).stages[0]
            evaluation = read_eval_report(build / EVAL_JSON)
            figures["train_wall_s"] = report.wall_s
            figures["train_real_tokens_per_s"] = report.tokens_per_s
            figures["heldout_accuracy"] = evaluation.accuracy
            figures["majority_baseline"] = evaluation.majority_baseline
            figures["macro_f1"] = evaluation.macro_f1
            figures["eval_generation_s"] = evaluation.generation_s
    for key, value in figures.items():
        print(f"{key}: {value}")
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
