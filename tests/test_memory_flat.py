"""Host memory stays flat through training on batches of very different lengths.

The runtime records the process's current resident set (`rss_gib`) at every logged step. Before
freed activations went back to the system, each new, longer batch left its blocks resident in
glibc's heap, so that figure climbed with the longest batch seen so far.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, base_recipe, run_cli, write_json_recipe

WARMUP_STEPS = 3  # the first steps load libraries and build optimizer state
STEPS = 20


def _varied_lengths_tsv(path: Path, rows: int = 64, seed: int = 3) -> None:
    """Rows of 3 to 700 words, spread evenly in log length, so batches range from ~20 to ~800 tokens."""
    rng = random.Random(seed)
    words = ["good", "bad", "day", "the", "team", "line", "work", "noon", "bus", "rain", "sun", "game"]
    lines = []
    for i in range(rows):
        n = round(3 * (700 / 3) ** (i / (rows - 1)))
        score = rng.choice([-2.0, 0.0, 2.0])
        lines.append(f"{i + 1}\t{score}\t{' '.join(rng.choice(words) for _ in range(n))}")
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_resident_memory_stays_flat_across_batch_lengths(tmp_path: Path) -> None:
    data = tmp_path / "varied.tsv"
    _varied_lengths_tsv(data)
    recipe = base_recipe(
        name="flat",
        model={"init": "scratch", "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": "auto", "dropout": 0.0},
        train={"epochs": None, "max_steps": STEPS, "micro_batch_size": 8, "learning_rate": 1e-3,
               "log_every_steps": 1},
    )
    del recipe["train"]["epochs"]
    del recipe["eval"]
    recipe["data"]["tweets"]["source"] = {"path": str(data)}
    recipe["data"]["tweets"]["split"] = {"heldout_fraction": 0.1, "seed": 1}
    build = tmp_path / "flat"
    result = run_cli("compile", str(write_json_recipe(tmp_path, recipe)), "--out", str(build), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trained = subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=tmp_path, capture_output=True,
                             text=True, env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO)))
    assert trained.returncode == 0, trained.stderr

    records = [json.loads(line) for line in (build / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    rows = [json.loads(line) for line in (build / "data" / "tweets" / "train.jsonl").read_text().splitlines()]
    lengths = sorted(len(r["prompt"]) + len(r["completion"]) for r in rows)
    assert lengths[0] < 30 and lengths[-1] > 600  # the batches really differ in length
    settled = [r["rss_gib"] for r in records[WARMUP_STEPS:]]
    assert max(settled) <= 1.10 * min(settled), settled
