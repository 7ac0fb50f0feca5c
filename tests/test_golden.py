"""Golden build directories: recompiling an example must give exactly the files reviewed here.

The reviewable files (plan, runtime config, launch scripts, DeepSpeed config, manifest) are kept
byte for byte under tests/golden/<recipe>/; the large ones (tokenized data, tokenizer) are pinned
through the sha256 the golden manifest records for every file. After a deliberate change,
regenerate with `RECIPE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py` and review the diff.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from compiler.emission.build import compile_recipe
from tests.conftest import REPO

GOLDEN = REPO / "tests" / "golden"
CASES = ["tweet-sentiment", "chatglm3-ptuning", "qwen2-7b-lora"]
KEPT = ("plan.md", "plan.json", "runtime.json", "launch.sh", "job.slurm", "ds_config.json", "manifest.json")


def _comparable(rel: str, content: bytes) -> bytes:
    """The manifest records the installed package versions, which belong to the machine, not the
    recipe (tests/test_launch.py checks them); golden manifests are kept without them."""
    if rel != "manifest.json":
        return content
    manifest = json.loads(content)
    manifest.pop("versions", None)
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


@pytest.mark.parametrize("name", CASES)
def test_build_equals_the_golden_files(name: str, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # the plan names the recipe relative to the working directory
    build = compile_recipe(REPO / "specs" / "examples" / f"{name}.toml")
    folder = GOLDEN / name
    if os.environ.get("RECIPE_UPDATE_GOLDEN") == "1":
        folder.mkdir(parents=True, exist_ok=True)
        for rel in KEPT:
            (folder / rel).write_bytes(_comparable(rel, build.files[rel]))
    for rel in KEPT:
        assert _comparable(rel, build.files[rel]) == (folder / rel).read_bytes(), f"{name}/{rel} differs"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == set(build.files) - {"manifest.json"}
    for rel, content in build.files.items():
        if rel != "manifest.json":
            assert hashlib.sha256(content).hexdigest() == manifest["files"][rel], rel
