"""Time `recipe eval` on 1,000+ held-out tweets with the tweet-sentiment model.

    .venv/bin/python benchmarks/eval_speed.py [--keep DIR]

Compiles specs/examples/tweet-sentiment.toml with a held-out fraction of 0.24 (1,008 tweets),
trains it for one epoch, then times `python -m runtime.evaluate` end to end (process start,
model load, batched greedy generation with the KV cache and left padding, the untrained
comparison, completion losses, reports). Target: under 30 s on a 2-core CPU.
Prints one line per figure; the last line is one JSON object.
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

from runtime.contract.artifacts import read_eval_report  # noqa: E402
from runtime.contract.layout import EVAL_JSON  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=Path, help="build here and keep it")
    args = parser.parse_args()
    build = args.keep or Path(tempfile.mkdtemp()) / "build"
    python = sys.executable
    subprocess.run([python, "-m", "compiler.cli", "compile", "specs/examples/tweet-sentiment.toml", "--out", str(build),
                    "--set", "data.tweets.split.heldout_fraction=0.24", "--set", "train.epochs=1"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    subprocess.run([python, "-m", "runtime.train", str(build)], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    started = time.perf_counter()
    subprocess.run([python, "-m", "runtime.evaluate", str(build)], check=True, cwd=REPO, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    report = read_eval_report(build / EVAL_JSON)
    print(f"held-out tweets: {report.n}")
    print(f"eval wall time (whole process): {wall:.1f} s (target < 30 s)")
    print(f"generation: {report.generation_s:.2f} s, {report.generated_tokens_per_s:.0f} generated tokens/s")
    print(f"accuracy {report.accuracy:.4f}, majority {report.majority_baseline:.4f}, "
          f"untrained {report.untrained_accuracy:.4f}")
    print(json.dumps({"n": report.n, "eval_wall_s": round(wall, 2), "generation_s": report.generation_s,
                      "generated_tokens_per_s": report.generated_tokens_per_s, "accuracy": report.accuracy},
                     sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
