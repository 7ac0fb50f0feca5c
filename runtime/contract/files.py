"""Files both sides write into a build directory: atomically, under locks, surviving a kill.

- `write_atomic`: one file, written beside its target and renamed into place.
- `replace_files`: a set of files in a folder that holds other things too (a compiled build's
  files beside the run's outputs; an eval's outputs), swapped in as one under a journal.
- `folder_lock`, `run_lock`: the lock a compile or eval holds while it swaps files, and the lock
  the run training a build holds.
- `write_failure`: whether a failed write ran out of space, in words.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import resource
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from runtime.contract.layout import RUN_LOCK_FILE


class RunLockBusy(Exception):
    """Another process is training this build directory."""


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list, after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(build_dir: Path, *, create: bool = True) -> Iterator[None]:
    """Hold the build's run lock (an flock on `.run.lock`) until the block ends; raise RunLockBusy
    at once when another process holds it. With `create=False` a build that has never been run
    (no lock file) is not given one: the block runs, nothing is locked."""
    path = Path(build_dir) / RUN_LOCK_FILE
    if not create and not path.is_file():
        yield
        return
    with open(path, "a+b") as lock:  # writable: NFS grants exclusive locks only on files open for writing
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockBusy(str(build_dir)) from None
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


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
        fsync_path(staging)
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
    fsync_path(folder)
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
    fsync_path(folder)
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
