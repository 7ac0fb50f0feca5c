"""No space for a checkpoint: training stops with one clear line, the last good checkpoint is
untouched, and a rerun with space resumes from it.

The full disk is simulated without root: once training has written a checkpoint, the test lowers
the training process's file size limit (RLIMIT_FSIZE, through prlimit) below the size of a
checkpoint file. The process ignores SIGXFSZ (Python does by default), so the next checkpoint's
writes fail as they would on a full disk."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.contract.layout import CHECKPOINT_DIR
from runtime.core import checkpoint as ckpt
from tests.conftest import REPO, base_recipe, run_cli, write_json_recipe

STEPS, SAVE_EVERY = 20, 5
LIMIT_BYTES = 1 << 20  # a checkpoint's weights take 6.5 MB; metrics and logs stay far below this


def _ignore_sigxfsz() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit")
def test_checkpoint_on_a_full_disk_fails_cleanly_and_resumes(tmp_path: Path) -> None:
    recipe = base_recipe(name="fulldisk", train={"max_steps": STEPS, "micro_batch_size": 4, "learning_rate": 1e-3,
                                                  "save_every_steps": SAVE_EVERY, "keep_checkpoints": 2,
                                                  "log_every_steps": 1})
    del recipe["train"]["epochs"]
    del recipe["eval"]
    build = tmp_path / "build"
    assert run_cli("compile", str(write_json_recipe(tmp_path, recipe)), "--out", str(build)).returncode == 0
    root = build / CHECKPOINT_DIR

    process = subprocess.Popen([sys.executable, "-m", "runtime.train", str(build)], cwd=REPO, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_ignore_sigxfsz,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 120
    while not ckpt.complete_checkpoints(root) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))  # the disk fills up
    stderr = process.communicate(timeout=120)[1]

    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    good = ckpt.complete_checkpoints(root)
    assert good, "no checkpoint survived"
    failed_at = f"{int(good[-1].name.rsplit('step', 1)[1]) + SAVE_EVERY:07d}"
    assert errors[0] == (
        f"error: could not write checkpoint {root}/00-sft-step{failed_at}: file too large (the file size limit, "
        f"ulimit -f, is {LIMIT_BYTES:,} bytes); the newest good checkpoint, {good[-1].name}, is untouched; free "
        "some space and run again to resume from it")
    # The last good checkpoint still verifies against the sizes and hashes it was committed with,
    # and the half-written one is gone.
    state, problem = ckpt.verify(good[-1])
    assert problem is None and state.step == int(good[-1].name.rsplit("step", 1)[1])
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert not (build / "model").exists()

    # A staging folder left by a process that died mid-save is removed by the next run.
    leftover = root / ".tmp-00-sft-step0000099"
    leftover.mkdir()
    (leftover / "trainable.pt").write_bytes(b"half")

    rerun = subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=REPO, capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f'resuming stage "sft" at step {state.step}/{STEPS} from {good[-1]}' in rerun.stderr
    assert not leftover.exists()
    steps = [json.loads(line)["step"] for line in (build / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == STEPS and sorted(set(steps)) == list(range(1, STEPS + 1))
    assert (build / "model" / "model.safetensors").is_file()
