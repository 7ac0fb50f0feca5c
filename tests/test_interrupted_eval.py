"""`recipe eval` killed while writing its outputs: the previous eval.json, eval.md,
predictions.jsonl and confusion.png stay one consistent set, and the next eval completes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.cli.running import check_build
from runtime.contract.files import CRASH_AT_ENV, SWAP_PREFIX
from tests.conftest import REPO, base_recipe, run_cli, write_json_recipe

OUTPUTS = ("eval.json", "eval.md", "predictions.jsonl", "confusion.png")
# An earlier eval's outputs, recognisable byte for byte.
PREVIOUS = {name: f"previous {name}\n".encode() for name in OUTPUTS}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    recipe = write_json_recipe(root, base_recipe(name="evalkill"))
    build = root / "build"
    assert run_cli("compile", str(recipe), "--out", str(build), cwd=root).returncode == 0
    done = subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return build


def _eval(build: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if crash_at:
        env[CRASH_AT_ENV] = crash_at
    return subprocess.run([sys.executable, "-m", "runtime.evaluate", str(build)], cwd=REPO, env=env,
                          capture_output=True, text=True)


def _outputs(build: Path) -> dict[str, bytes]:
    return {name: (build / name).read_bytes() for name in OUTPUTS if (build / name).is_file()}


def _assert_one_eval(build: Path) -> None:
    """The four files describe the same eval: counts, accuracy and loss agree across them, and the
    plot is the one this eval.json draws."""
    from runtime.evaluate import confusion_png

    report = json.loads((build / "eval.json").read_text())
    predictions = [json.loads(line) for line in (build / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == report["n"]
    assert report["accuracy"] == round(sum(p["predicted"] == p["label"] for p in predictions) / report["n"], 4)
    assert abs(report["loss"] - sum(p["loss"] for p in predictions) / len(predictions)) < 1e-3
    assert f"completion loss {report['loss']:.4f}" in (build / "eval.md").read_text()
    # eval.json sorts its keys; the plot has the label columns in the recipe's order, then "(other)".
    report["confusion"] = {gold: {**{c: n for c, n in row.items() if c != "(other)"}, "(other)": row["(other)"]}
                           for gold, row in report["confusion"].items()}
    assert (build / "confusion.png").read_bytes() == confusion_png(report)


@pytest.mark.slow
def test_killed_eval_keeps_the_previous_outputs_whole(trained: Path, tmp_path: Path) -> None:
    build = tmp_path / "build"
    shutil.copytree(trained, build, symlinks=True)
    for name, content in PREVIOUS.items():
        (build / name).write_bytes(content)

    # Killed while the new outputs are still being written aside: nothing changed.
    killed = _eval(build, "eval:staging")
    assert killed.returncode == -signal.SIGKILL
    assert _outputs(build) == PREVIOUS

    # Killed in the middle of the swap: on disk, some files are new and some old ...
    killed = _eval(build, "eval:swapping")
    assert killed.returncode == -signal.SIGKILL
    mixed = _outputs(build)
    assert {n for n in OUTPUTS if mixed.get(n) == PREVIOUS[n]} not in (set(), set(OUTPUTS))
    # ... and the first thing `recipe eval` / `recipe run` (or the next eval) does puts the
    # previous set back whole.
    probe = tmp_path / "probe"
    shutil.copytree(build, probe, symlinks=True)
    check_build(probe)
    assert _outputs(probe) == PREVIOUS
    assert not (probe / "eval.json").read_bytes().startswith(b"{")

    # The next eval completes, and its four files are one eval's.
    again = _eval(build)
    assert again.returncode == 0, again.stderr
    outputs = _outputs(build)
    assert set(outputs) == set(OUTPUTS) and not set(outputs.items()) & set(PREVIOUS.items())
    _assert_one_eval(build)
    assert not list(build.glob(f"{SWAP_PREFIX}*"))
