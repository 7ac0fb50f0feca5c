"""Training checkpoints that survive being killed at any moment.

A checkpoint is a folder `checkpoints/<stage index>-<stage>-step<step>/` holding the trainable
weights, optimizer, scheduler, gradient scaler and every rank's random-number state, plus
`state.json`, written last, which records where training stands (stage, step, data position) and
the size and sha256 of every other file. The folder is assembled under a temporary name and
renamed into place, so a reader sees either a whole checkpoint or none; a checkpoint whose files
do not match its `state.json` (a disk that filled up, a copy cut short) is reported and skipped.

The same guarantee for a set of files written into a folder that holds other things too (a
compiled build's files beside the run's outputs; an eval's outputs) is `replace_files`, below.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
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


def checkpoint_name(state: TrainState) -> str:
    return f"{state.stage_index:02d}-{state.stage}-step{state.step:07d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        _fsync(path)
    record = {"state": asdict(state), "files": files}
    state_path = staging / STATE_FILE
    with open(state_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    final = root / checkpoint_name(state)
    if final.exists():  # the same step saved again after a resume: replace it whole
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync(root)
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
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=_order)


def verify(path: Path) -> tuple[TrainState | None, str | None]:
    """(state, None) for a usable checkpoint, else (None, what is wrong with it)."""
    try:
        record = json.loads((path / STATE_FILE).read_text())
        state = TrainState(**record["state"])
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{STATE_FILE} is unreadable ({exc})"
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


# Below this much free space a failed write is taken to be a full disk.
LOW_SPACE_BYTES = 64 * 2**20


def write_failure(folder: Path, exc: BaseException) -> str | None:
    """Why writing into `folder` failed, in words, when the cause is space (a full disk, a quota, the
    file size limit); None when it is something else. torch's own file writer reports a failed
    write as a RuntimeError without an errno, so the disk and the limit are looked at directly."""
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC:
        return "the disk is full"
    if code == errno.EDQUOT:
        return "the disk quota is used up"
    if code == errno.EFBIG:
        return "file too large (over the file size limit, ulimit -f)"
    if code is not None:
        return None
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        free = None
    if free is not None and free < LOW_SPACE_BYTES:
        return f"the disk is full ({free / 2**20:.0f} MiB free)"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and folder.is_dir() and any(
            p.is_file() and p.stat().st_size >= limit for p in folder.rglob("*")):
        return f"file too large (the file size limit, ulimit -f, is {limit:,} bytes)"
    return None


def remove_stale_staging(root: Path) -> None:
    """Delete staging folders left by a process that died mid-save (never a complete checkpoint)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# replacing a set of files as one: a compiled build's files, an eval's outputs
#
# The new files are written into a staging folder inside the target folder; then a journal,
# listing every file with whether a previous version existed, marks the start of the swap;
# each previous file is moved into the staging folder before the new one is moved into place;
# the journal is renamed to `done` when the swap is complete. A process killed before the
# journal changed nothing; one killed during the swap is rolled back by `roll_back_interrupted`
# (the previous versions are still in the staging folder). Nothing else in the folder is touched.

SWAP_PREFIX = ".swap-"
JOURNAL_FILE = "journal.json"
SWAP_DONE_FILE = "done"
# Tests set this to a crash point's name ("compile:journal", "eval:swapping", ...) and the process
# SIGKILLs itself there, to check what an interruption at that moment leaves behind.
CRASH_AT_ENV = "RECIPE_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive flock on the folder itself while its files are swapped or repaired (a
    second compile or eval waits; the OS releases the lock when the process dies)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a file system that cannot lock a folder (some NFS mounts): go on unlocked
            if exc.errno not in (errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        yield
    finally:
        os.close(fd)  # releases the lock


def _safe_relative(rel: str) -> bool:
    pure = PurePosixPath(rel)
    return bool(rel) and not pure.is_absolute() and ".." not in pure.parts


def _write_synced(path: Path, content: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask applies at creation; the mode is part of the content
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def replace_files(folder: Path, kind: str, files: dict[str, bytes | None], executable: frozenset[str] = frozenset()
                  ) -> list[str]:
    """Make `folder` hold `files` (relative path -> content, or None to delete it) all at once, as
    far as any later reader can tell. The caller holds `folder_lock(folder)`. Returns the paths
    that changed."""
    staging = folder / f"{SWAP_PREFIX}{kind}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    changes: dict[str, dict[str, bool]] = {}
    try:
        for rel, content in sorted(files.items()):
            if not _safe_relative(rel):
                raise ValueError(f"refusing to write {rel!r} outside {folder}")
            target = folder / rel
            old = target.is_file() or target.is_symlink()
            if content is None:
                if old:
                    changes[rel] = {"old": True, "new": False}
                continue
            if target.is_file() and not target.is_symlink() and target.read_bytes() == content \
                    and bool(target.stat().st_mode & 0o111) == (rel in executable):
                continue  # unchanged: left as it is
            _write_synced(staging / "new" / rel, content, 0o755 if rel in executable else 0o644)
            changes[rel] = {"old": old, "new": True}
            crash_point(f"{kind}:staging")
        for rel, change in changes.items():  # every folder the swap needs, so that it only renames
            (staging / "old" / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        journal = (json.dumps({"files": changes}, indent=1, sort_keys=True) + "\n").encode()
        _write_synced(staging / f".{JOURNAL_FILE}", journal)
        os.replace(staging / f".{JOURNAL_FILE}", staging / JOURNAL_FILE)
        _fsync(staging)
    except BaseException:  # nothing in the folder changed yet (a full disk, most likely)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    crash_point(f"{kind}:journal")
    try:
        for i, (rel, change) in enumerate(sorted(changes.items())):
            if change["old"]:
                os.replace(folder / rel, staging / "old" / rel)
            if change["new"]:
                os.replace(staging / "new" / rel, folder / rel)
            if i == len(changes) // 2:
                crash_point(f"{kind}:swapping")
    except BaseException:
        _roll_back(folder, staging)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync(folder)
    os.replace(staging / JOURNAL_FILE, staging / SWAP_DONE_FILE)
    crash_point(f"{kind}:done")
    shutil.rmtree(staging)
    for rel, change in changes.items():
        if not change["new"]:
            _remove_empty_parents(folder / rel, folder)
    return sorted(changes)


def _remove_empty_parents(path: Path, stop: Path) -> None:
    for parent in path.parents:
        if parent == stop or stop not in parent.parents:
            return
        try:
            parent.rmdir()
        except OSError:  # not empty
            return


def _roll_back(folder: Path, staging: Path) -> None:
    """Undo the swap `staging`'s journal describes, wherever it stopped; safe to repeat."""
    journal = staging / JOURNAL_FILE
    changes = json.loads(journal.read_text())["files"]
    for rel, change in sorted(changes.items()):
        if not _safe_relative(rel):
            continue
        target, kept = folder / rel, staging / "old" / rel
        if change["old"]:
            # Moved aside and not yet restored: put it back (over the new file, if any).
            # Not in the staging folder: never moved, or restored already; keep it.
            if kept.is_file() or kept.is_symlink():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(kept, target)
        elif target.is_file() or target.is_symlink():
            target.unlink()  # only the new version ever existed
    _fsync(folder)
    journal.unlink()


def interrupted_swaps(folder: Path, kind: str | None = None) -> list[Path]:
    """Staging folders of swaps into `folder` that a killed process left behind."""
    pattern = f"{SWAP_PREFIX}{kind}-*" if kind else f"{SWAP_PREFIX}*"
    return sorted(p for p in folder.glob(pattern) if p.is_dir()) if folder.is_dir() else []


def roll_back_interrupted(folder: Path, kind: str | None = None, *, clean: bool = False) -> list[Path]:
    """Put back the previous files of every swap into `folder` that was killed half way, and
    return the staging folders that were rolled back. With `clean`, delete the staging folders
    (rolled back, finished, or never started). The caller holds `folder_lock(folder)`."""
    rolled_back = []
    for staging in interrupted_swaps(folder, kind):
        if (staging / JOURNAL_FILE).is_file():
            _roll_back(folder, staging)
            rolled_back.append(staging)
        if clean:
            shutil.rmtree(staging, ignore_errors=True)
    return rolled_back
