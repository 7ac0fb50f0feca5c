"""The asset cache, read-only: which pinned assets exist (`specs/assets.toml`) and where a
fetched one lies. Fetching (download, verify, unpack) is the compiler's `compiler.data.assets`;
the runtime only looks assets up, so a run never reaches for the network.

A fetched asset lives under `cache_dir()/assets/<name>-<sha256[:16]>/`, complete once its
`source.json` marker names the same sha256 and member.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

from runtime.contract.paths import specs_dir

DISTS = ("sdist", "wheel", "npm")
MARKER_FILE = "source.json"

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Names end up as directory names; package and version end up as command arguments,
# so neither may start with "-" (it would read as an option).
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_PACKAGE_RE = re.compile(r"(@[a-z0-9][a-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*")


class AssetError(Exception):
    """A user-facing failure: says which asset, what went wrong and how to fix it."""


@dataclass(frozen=True)
class AssetSpec:
    """One pinned asset, as declared in `specs/assets.toml`."""

    name: str
    package: str
    version: str
    dist: str
    sha256: str
    member: tuple[str, ...]
    license: str
    description: str

    def __post_init__(self) -> None:
        problem = _spec_problem(self)
        if problem is not None:
            key, message = problem
            raise AssetError(f"asset [{self.name}], key {key!r}: {message}")

    @property
    def directory_name(self) -> str:
        """Cache folder name; includes the hash so a re-pinned asset never reuses a stale file."""
        return f"{self.name}-{self.sha256[:16]}"

    @property
    def filename(self) -> str:
        """Base name of the unpacked file in the cache."""
        return PurePosixPath(self.member[-1]).name


def _spec_problem(spec: AssetSpec) -> tuple[str, str] | None:
    """The first invalid key of `spec` and why, or None if the spec is valid."""
    if not _NAME_RE.fullmatch(spec.name):
        return "name", "use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit"
    if not _PACKAGE_RE.fullmatch(spec.package):
        return "package", f"{spec.package!r} is not a valid package name"
    if not _VERSION_RE.fullmatch(spec.version):
        return "version", f"{spec.version!r} is not an exact version (e.g. \"3.3.2\")"
    if spec.dist not in DISTS:
        return "dist", f"{spec.dist!r} is not one of {', '.join(DISTS)}"
    if not _SHA256_RE.fullmatch(spec.sha256):
        return "sha256", "expected 64 lowercase hex digits (the sha256 of the downloaded archive)"
    if not spec.member:
        return "member", "list at least one path (the file inside the download)"
    for path in spec.member:
        reason = _unsafe_member_reason(path)
        if reason is not None:
            return "member", f"{path!r} {reason}"
    return None


def _unsafe_member_reason(path: str) -> str | None:
    """Why `path` may not be used as an archive member path, or None if it is fine."""
    if not path:
        return "is empty"
    if "\\" in path:
        return "contains a backslash; use '/' between folders"
    pure = PurePosixPath(path)
    if pure.is_absolute():
        return "is absolute; give the path relative to the archive root"
    if ".." in pure.parts:
        return "contains '..'; member paths must stay inside the archive"
    return None


def default_catalog_path() -> Path:
    """Where the asset catalog lives: `specs/assets.toml`."""
    return specs_dir() / "assets.toml"


def load_catalog(path: Path | None = None) -> dict[str, AssetSpec]:
    """Read and validate an asset catalog (default `specs/assets.toml`), keyed by asset name."""
    path = default_catalog_path() if path is None else Path(path)
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise AssetError(f"asset catalog {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise AssetError(f"asset catalog {path} is not valid TOML: {e}") from None

    catalog: dict[str, AssetSpec] = {}
    for name, table in document.items():
        try:
            catalog[name] = _spec_from_table(name, table)
        except AssetError as e:
            raise AssetError(f"{path}: {e}") from None
    return catalog


def _spec_from_table(name: str, table: object) -> AssetSpec:
    """Check the keys and value types of one catalog table and build its AssetSpec."""
    if not isinstance(table, dict):
        raise AssetError(f"[{name}] must be a table of keys, not a single value")
    expected = [f.name for f in fields(AssetSpec) if f.name != "name"]
    for key in table:
        if key not in expected:
            close = difflib.get_close_matches(key, expected, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(expected)}"
            raise AssetError(f"asset [{name}], key {key!r}: unknown key{hint}")
    for key in expected:
        if key not in table:
            raise AssetError(f"asset [{name}], key {key!r}: missing")
    values = {key: table[key] for key in expected}
    if isinstance(values["member"], str):
        values["member"] = [values["member"]]
    for key, value in values.items():
        if key == "member":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise AssetError(f"asset [{name}], key 'member': expected a list of paths")
        elif not isinstance(value, str):
            raise AssetError(f"asset [{name}], key {key!r}: expected a string, got {type(value).__name__}")
    values["member"] = tuple(values["member"])
    return AssetSpec(name=name, **values)


def cache_dir() -> Path:
    """Root of recipe's download cache: `$RECIPE_CACHE` if set, else `~/.cache/recipe`."""
    override = os.environ.get("RECIPE_CACHE")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "recipe"


def asset_dir(spec: AssetSpec) -> Path:
    """The cache folder of one asset."""
    return cache_dir() / "assets" / spec.directory_name


def is_complete(spec: AssetSpec, directory: Path) -> bool:
    """True when the marker says this exact asset was fully unpacked into `directory`."""
    try:
        source = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(source, dict)
        and source.get("sha256") == spec.sha256
        and source.get("member") == list(spec.member)
        and (directory / spec.filename).is_file()
    )


def cached_asset(spec: AssetSpec) -> Path:
    """Path of the asset's unpacked file in the cache; AssetError with the fix when it is not there."""
    directory = asset_dir(spec)
    if not is_complete(spec, directory):
        raise AssetError(
            f"asset {spec.name!r} ({spec.package} {spec.version}) is not in the cache at {directory}; "
            f"run `recipe fetch {spec.name}` on a machine with registry access "
            f"(set RECIPE_CACHE to use a different cache folder)"
        )
    return directory / spec.filename
