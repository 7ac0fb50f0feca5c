"""`manifest.json`: the sha256 of the recipe, of every data file read and of every file written,
and the installed versions of the packages a run depends on. `recipe run` refuses a build whose
files no longer match; the next compile removes what the previous one listed and no longer writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from compiler.data.prepare import PreparedData
from compiler.loading.loader import LoadedRecipe, display_path
from runtime.contract.config import SCHEMA_VERSION
from runtime.contract.layout import MANIFEST_FILE

_VERSIONED = ("recipe", "torch", "transformers", "peft", "deepspeed", "datasets", "tokenizers")


def manifest(loaded: LoadedRecipe, files: dict[str, bytes], prepared: dict[str, PreparedData]) -> str:
    """The manifest of a build whose other files are `files` (relative path -> content)."""
    data = {}
    for name, p in sorted(prepared.items()):
        data[name] = {
            "source": p.source_label,
            "files": {path.name: _sha256(path.read_bytes()) for path in p.files},
        }
    record = {
        "schema_version": SCHEMA_VERSION,
        "versions": _versions(),
        "recipe": {"file": Path(display_path(loaded.path)).as_posix(), "sha256": _sha256(loaded.text.encode())},
        "data": data,
        "files": {rel: _sha256(content) for rel, content in sorted(files.items())},
    }
    code = [{"stage": s.name, "reward": r.name or r.kind, "function": r.function} for s in loaded.recipe.stages
            if s.kind == "grpo" for r in s.rewards if r.kind == "python"]
    if code:  # python rewards: the recipe's own code that training will run (allow_code = true)
        record["code_to_run"] = code
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


def listed_files(out_dir: Path) -> set[str]:
    """The files the build in `out_dir` lists in its manifest (and the manifest itself); nothing
    when there is no readable manifest. Only paths inside the folder: an edited manifest must not
    make a compile delete anything else."""
    path = out_dir / MANIFEST_FILE
    try:
        files = set(json.loads(path.read_text())["files"]) | {MANIFEST_FILE}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {rel for rel in files if isinstance(rel, str) and rel and not Path(rel).is_absolute()
            and ".." not in Path(rel).parts}


def _versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on (read from metadata; nothing imported)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
