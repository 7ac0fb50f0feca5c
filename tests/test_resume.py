"""Checkpoints under SIGKILL: a killed run resumes exactly where its last checkpoint left off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from runtime.contract.layout import CHECKPOINT_DIR
from runtime.core import checkpoint as ckpt
from tests.conftest import REPO, base_recipe, run_cli, write_json_recipe

SAVE_EVERY = 5
STEPS = 40
EVAL_EVERY = 3  # evaluations between checkpoints: resuming must stay exact with them


def _compile(tmp_path: Path, name: str, **train) -> Path:
    recipe = base_recipe(
        name=name,
        model={"n_embd": 32, "n_layer": 2, "n_head": 2, "dropout": 0.1},  # dropout: the RNG state matters
        train={"epochs": None, "max_steps": STEPS, "micro_batch_size": 4, "learning_rate": 1e-3,
               "save_every_steps": SAVE_EVERY, "keep_checkpoints": 2, "log_every_steps": 1,
               "eval_every_steps": EVAL_EVERY, **train},
        eval=None,
    )
    del recipe["train"]["epochs"]
    del recipe["eval"]
    path = write_json_recipe(tmp_path, recipe, name=f"{name}.json")
    build = tmp_path / name
    compiled = run_cli("compile", str(path), "--out", str(build), cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    return build


def _train(build: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _weights(build: Path) -> dict:
    return load_file(build / "model" / "model.safetensors")


def _metrics(build: Path) -> list[dict]:
    """The training rows of metrics.jsonl (the held-out rows are in `_evals`)."""
    rows = [json.loads(line) for line in (build / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def _evals(build: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (build / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["eval_loss"] for row in rows if "eval_loss" in row}


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    reference = _compile(tmp_path, "whole")
    done = _train(reference)
    assert done.returncode == 0, done.stderr

    build = _compile(tmp_path, "killed")
    process = subprocess.Popen([sys.executable, "-m", "runtime.train", str(build)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = build / CHECKPOINT_DIR
    deadline = time.monotonic() + 120
    while not ckpt.complete_checkpoints(root) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (build / "model").exists()
    killed_at = max(json.loads(line)["step"] for line in (build / "metrics.jsonl").read_text().splitlines())
    assert killed_at < STEPS

    resumed = _train(build)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming stage \"sft\" at step" in resumed.stderr

    steps = [m["step"] for m in _metrics(build)]
    assert steps[-1] == STEPS
    repeated = len(steps) - len(set(steps))
    assert repeated <= SAVE_EVERY
    assert sorted(set(steps)) == list(range(1, STEPS + 1))

    # Exact resume: model, optimizer, scheduler, RNG (dropout) and data order all continue as if
    # nothing happened, so the final weights are bit-for-bit those of the uninterrupted run.
    expected, got = _weights(reference), _weights(build)
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] == got[name]).all(), name
    # The losses logged after the resume are the reference run's losses at the same steps.
    reference_loss = {m["step"]: m["loss"] for m in _metrics(reference)}
    for m in _metrics(build)[-5:]:
        assert m["loss"] == reference_loss[m["step"]]
    # So are the held-out losses, evaluated every EVAL_EVERY steps and after the last.
    assert sorted(_evals(reference)) == [*range(EVAL_EVERY, STEPS, EVAL_EVERY), STEPS]
    assert _evals(build) == _evals(reference)
    # keep_checkpoints = 2: older checkpoints were deleted as newer ones were written.
    assert len(ckpt.complete_checkpoints(root)) <= 2

    # Running the finished build again trains nothing.
    again = _train(build)
    assert again.returncode == 0 and "already finished" in again.stderr


@pytest.mark.slow
def test_damaged_checkpoint_is_skipped_with_a_message(tmp_path: Path) -> None:
    build = _compile(tmp_path, "damaged", max_steps=12, keep_checkpoints=3)
    first = _train(build)
    assert first.returncode == 0, first.stderr
    found = ckpt.complete_checkpoints(build / CHECKPOINT_DIR)
    assert [p.name for p in found] == ["00-sft-step0000005", "00-sft-step0000010"]
    newest = found[-1]
    # Cut the newest checkpoint's weights short, as a full disk or an interrupted copy would.
    weights = newest / "trainable.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (build / "stages" / "sft" / "done.json").unlink()  # make the stage unfinished again

    second = _train(build)
    assert second.returncode == 0, second.stderr
    assert f"checkpoint {newest} is damaged (trainable.pt has" in second.stderr
    assert "resuming stage \"sft\" at step 5/12" in second.stderr


def test_checkpoint_of_another_compile_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    state = ckpt.TrainState(config_sha256="a" * 64, stage_index=0, stage="sft", step=3, total_steps=9, epoch=0,
                            batch=3, tokens=10, elapsed_s=1.0, world_size=1)
    staging = ckpt.staging_dir(root, state)
    staging.mkdir(parents=True)
    (staging / "trainable.pt").write_bytes(b"x" * 10)
    ckpt.commit(root, staging, state, keep=2)
    assert ckpt.latest_usable(root, "a" * 64, print)[1] == state
    with pytest.raises(ckpt.CheckpointError, match="earlier compile"):
        ckpt.latest_usable(root, "b" * 64, print)


def test_commit_keeps_the_newest_and_leaves_no_staging(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        state = ckpt.TrainState(config_sha256="c", stage_index=0, stage="sft", step=step, total_steps=9, epoch=0,
                                batch=step, tokens=step, elapsed_s=0.0, world_size=1)
        staging = ckpt.staging_dir(root, state)
        staging.mkdir(parents=True)
        (staging / "f.bin").write_bytes(bytes([step]) * step)
        ckpt.commit(root, staging, state, keep=2)
    assert [p.name for p in sorted(root.iterdir())] == ["00-sft-step0000006", "00-sft-step0000008"]
    record = json.loads((root / "00-sft-step0000008" / "state.json").read_text())
    assert record["files"]["f.bin"]["bytes"] == 8
    # a staging folder left by a killed save is never taken for a checkpoint, and is cleaned up
    (root / ".tmp-00-sft-step0000010").mkdir()
    assert [p.name for p in ckpt.complete_checkpoints(root)][-1] == "00-sft-step0000008"
    ckpt.remove_stale_staging(root)
    assert not (root / ".tmp-00-sft-step0000010").exists()
