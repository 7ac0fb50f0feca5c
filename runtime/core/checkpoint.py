"""Training checkpoints that survive being killed at any moment.

A checkpoint is a folder `checkpoints/<stage index>-<stage>-step<step>/` holding the trainable
weights, optimizer, scheduler, gradient scaler and every rank's random-number state, plus
`state.json`, written last, which records where training stands (stage, step, data position) and
the size and sha256 of every other file. The folder is assembled under a temporary name and
renamed into place, so a reader sees either a whole checkpoint or none; a checkpoint whose files
do not match its `state.json` (a disk that filled up, a copy cut short) is reported and skipped.
`save_checkpoint` writes one from every process of a run: rank 0 prepares and commits the
folder, every rank writes its own part, and a failure on any rank (a full disk) stops them all.

The same guarantee for a set of files in a folder that holds other things too is
`runtime.contract.files.replace_files`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from runtime.contract.files import fsync_path, write_failure
from runtime.contract.layout import CHECKPOINT_STATE_FILE, rng_file
from runtime.core.distributed import Dist, any_rank

_NAME = re.compile(r"^(\d+)-(.+)-step(\d+)$")


class CheckpointError(Exception):
    """Checkpoints that cannot be used; the message names the folder and the way out."""


@dataclass(frozen=True)
class TrainState:
    """Where training stands after an optimizer step; enough to continue exactly."""

    config_sha256: str  # of runtime.json: a checkpoint only resumes the build that wrote it
    stage_index: int
    stage: str
    step: int  # optimizer steps completed in this stage
    total_steps: int
    epoch: int  # epoch of the next batch
    batch: int  # index of the next micro-batch within that epoch (per rank)
    tokens: int  # non-pad tokens processed so far in this stage, all ranks
    elapsed_s: float  # training time so far in this stage, over all attempts
    world_size: int
    # the held-out losses so far in this stage, (step, loss): save_best and early stopping go on from them
    evaluations: tuple[tuple[int, float], ...] = ()


def checkpoint_name(state: TrainState) -> str:
    return f"{state.stage_index:02d}-{state.stage}-step{state.step:07d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def staging_dir(root: Path, state: TrainState) -> Path:
    """The temporary folder a checkpoint is written into before `commit` renames it."""
    return root / f".tmp-{checkpoint_name(state)}"


def commit(root: Path, staging: Path, state: TrainState, keep: int) -> Path:
    """Record sizes and hashes in `state.json`, flush everything to disk, rename the staging folder
    into place, and delete all but the newest `keep` checkpoints."""
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        rel = path.relative_to(staging).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        fsync_path(path)
    record = {"state": asdict(state), "files": files}
    state_path = staging / CHECKPOINT_STATE_FILE
    with open(state_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    final = root / checkpoint_name(state)
    if final.exists():  # the same step saved again after a resume: replace it whole
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_path(root)
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _order(path: Path) -> tuple[int, int]:
    match = _NAME.match(path.name)
    return (int(match.group(1)), int(match.group(3))) if match else (-1, -1)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders with a `state.json`, oldest first (not verified; see `verify`)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / CHECKPOINT_STATE_FILE).is_file()]
    return sorted(found, key=_order)


def verify(path: Path) -> tuple[TrainState | None, str | None]:
    """(state, None) for a usable checkpoint, else (None, what is wrong with it)."""
    try:
        record = json.loads((path / CHECKPOINT_STATE_FILE).read_text())
        raw = record["state"]
        evaluations = tuple((int(step), float(loss)) for step, loss in raw.pop("evaluations", ()))
        state = TrainState(**raw, evaluations=evaluations)
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{CHECKPOINT_STATE_FILE} is unreadable ({exc})"
    for rel, expected in sorted(files.items()):
        file = path / rel
        if not file.is_file():
            return None, f"{rel} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return None, f"{rel} has {size} bytes, {expected['bytes']} were written"
        if _sha256(file) != expected["sha256"]:
            return None, f"{rel} does not match its recorded sha256"
    return state, None


def latest_usable(root: Path, config_sha256: str, log) -> tuple[Path, TrainState] | None:
    """The newest checkpoint that verifies, reporting (through `log`) each one skipped.

    Raises CheckpointError when the checkpoints were written for a different compile: resuming
    them would silently mix two recipes."""
    for path in reversed(complete_checkpoints(root)):
        state, problem = verify(path)
        if state is None:
            log(f"checkpoint {path} is damaged ({problem}); skipping it")
            continue
        if state.config_sha256 != config_sha256:
            raise CheckpointError(
                f"{root} holds checkpoints of an earlier compile of this recipe (runtime.json changed since "
                f"{path.name} was written); move or delete {root} to train the new compile from the start"
            )
        return path, state
    return None


def remove_stale_staging(root: Path) -> None:
    """Delete staging folders left by a process that died mid-save (never a complete checkpoint)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# writing one from every process


class Checkpointable(Protocol):
    """What a stage saves: a backend, or a stage holding several (PPO's actor and critic)."""

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...


def rng_state() -> dict:
    """This process's random-number generators (python, torch, every visible GPU)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_state(folder: Path, rank: int) -> None:
    """Continue this process's random numbers where the checkpoint in `folder` left them."""
    set_rng_state(torch.load(folder / rng_file(rank), weights_only=False))


def save_checkpoint(root: Path, state: TrainState, keep: int, saved: Checkpointable, d: Dist,
                    device: torch.device) -> None:
    """Write a checkpoint of `saved` at `state` into `root` (collective: every rank calls it).

    Raises CheckpointError on every rank when any rank could not write its part for lack of
    space; the newest good checkpoint is left as it was."""
    staging = staging_dir(root, state)

    def attempt(write) -> str | None:
        """None when `write()` worked; what ran out (disk, quota, file size limit) when it did not."""
        try:
            write()
        except (OSError, RuntimeError) as exc:
            problem = write_failure(staging, exc)
            if problem is None:
                raise
            return problem
        return None

    def give_up_if_failed(problem: str | None) -> None:
        # A barrier that also tells every rank whether any rank failed, so none is left waiting.
        if not any_rank(problem is not None, d, device):
            return
        if d.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # give back the space; the last good checkpoint is untouched
        done = complete_checkpoints(root)
        if done:
            then = f"the newest good checkpoint, {done[-1].name}, is untouched; free some space and run again to " \
                "resume from it"
        else:
            then = "there is no earlier checkpoint; free some space and run again"
        raise CheckpointError(
            f"could not write checkpoint {root / checkpoint_name(state)}: "
            f"{problem or 'another process could not write its part'}; {then}")

    def prepare() -> None:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)

    def write_own_part() -> None:
        torch.save(rng_state(), staging / rng_file(d.rank))
        saved.save(staging)

    give_up_if_failed(attempt(prepare) if d.is_main else None)
    give_up_if_failed(attempt(write_own_part))
    give_up_if_failed(attempt(lambda: commit(root, staging, state, keep)) if d.is_main else None)


@contextmanager
def rng_restored(device: torch.device) -> Iterator[None]:
    """Every random number generator training draws from (torch's, the device's, Python's and
    NumPy's) as it was on entry: work done inside leaves the next training step's draws unchanged."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)
