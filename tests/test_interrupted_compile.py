"""`recipe compile` killed at any moment: the previous build stays usable, or, with none, the
half-written folder is refused as incomplete; the next compile succeeds and says what it found.
Run outputs beside the compiled files (checkpoints, stages, model, eval, the user's own files)
are never touched.

The compile kills itself at named points of the swap (RECIPE_CRASH_AT, see
runtime.contract.files.replace_files); a second test kills it from outside after varying delays.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compiler.cli import main
from compiler.cli.running import check_build
from compiler.diagnostics import RecipeError
from runtime.contract.files import CRASH_AT_ENV, SWAP_PREFIX
from tests.conftest import REPO, base_recipe, run_cli, write_json_recipe

CRASH_POINTS = ["compile:staging", "compile:journal", "compile:swapping", "compile:done"]
# What a run and the user put beside the compiled files.
RUN_OUTPUTS = {
    "checkpoints/00-sft-step0000005/state.json": b'{"state": {}}\n',
    "stages/sft/done.json": b'{"report": {}}\n',
    "model/config.json": b"{}\n",
    "eval.json": b'{"accuracy": 0.5}\n',
    "metrics.jsonl": b'{"step": 1}\n',
    "notes.txt": b"mine\n",
}


def _recipes(folder: Path) -> tuple[Path, Path]:
    """Two versions of one recipe whose builds differ in nearly every file: v1 has two stages
    (ds_config.<stage>.json each), v2 one (ds_config.json), another learning rate and split."""
    v1 = base_recipe(stages=[{"name": "sft", "kind": "sft"}, {"name": "more", "kind": "sft", "from": "sft"}])
    v2 = base_recipe(train={"learning_rate": 5e-4})
    v2["data"]["tweets"]["split"] = {"heldout_fraction": 0.5, "seed": 2}
    return write_json_recipe(folder, v1, "v1.json"), write_json_recipe(folder, v2, "v2.json")


def _compiled(out: Path) -> dict[str, bytes]:
    """The compiled files of a build, as its manifest lists them (plus the manifest)."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {rel: (out / rel).read_bytes() for rel in [*manifest["files"], "manifest.json"]}


def _run_outputs(out: Path) -> dict[str, bytes]:
    return {rel: (out / rel).read_bytes() for rel in RUN_OUTPUTS if (out / rel).is_file()}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """v1 compiled with run outputs beside it, and v2 compiled alone: the two states allowed."""
    root = tmp_path_factory.mktemp("compile")
    v1, v2 = _recipes(root)
    for recipe, out in ((v1, root / "v1"), (v2, root / "v2")):
        started = time.perf_counter()
        result = run_cli("compile", str(recipe), "--out", str(out), cwd=root)
        compile_s = time.perf_counter() - started
        assert result.returncode == 0, result.stderr
    for rel, content in RUN_OUTPUTS.items():
        (root / "v1" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "v1" / rel).write_bytes(content)
    return {"root": root, "v2_recipe": v2, "v1": _compiled(root / "v1"), "v2": _compiled(root / "v2"),
            "v1_dir": root / "v1", "compile_s": compile_s}


def _compile_again(builds: dict, out: Path, capsys, monkeypatch) -> tuple[int, str]:
    """The next, uninterrupted compile, in this process (as the recipe's folder sees it)."""
    monkeypatch.chdir(builds["root"])
    capsys.readouterr()
    code = main(["compile", str(builds["v2_recipe"]), "--out", str(out)])
    return code, capsys.readouterr().err


def _usable_as(out: Path, probe: Path) -> dict[str, bytes]:
    """Check a copy of `out` the way `recipe run` and `recipe eval` do first (which repairs a
    half-done swap) and return its compiled files."""
    shutil.copytree(out, probe, symlinks=True)
    check_build(probe)
    return _compiled(probe)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_killed_recompile_keeps_the_previous_build(builds, tmp_path: Path, monkeypatch, capsys, point: str) -> None:
    out = tmp_path / "build"
    shutil.copytree(builds["v1_dir"], out)
    monkeypatch.setenv(CRASH_AT_ENV, point)
    killed = run_cli("compile", str(builds["v2_recipe"]), "--out", str(out), cwd=builds["root"])
    monkeypatch.delenv(CRASH_AT_ENV)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # Before the swap finished: the previous build, whole; after it: the new one, whole.
    assert _usable_as(out, tmp_path / "probe") == (builds["v2"] if point == "compile:done" else builds["v1"])
    assert _run_outputs(out) == RUN_OUTPUTS

    code, stderr = _compile_again(builds, out, capsys, monkeypatch)
    assert code == 0, stderr
    if point in ("compile:journal", "compile:swapping"):
        assert f"note: {out} was left half-replaced by an interrupted `recipe compile`; restored the build it " \
               "replaced, then wrote this one" in stderr
    else:
        assert f"removed the leftovers of an interrupted `recipe compile` from {out}" in stderr
    assert _compiled(out) == builds["v2"]
    assert _run_outputs(out) == RUN_OUTPUTS
    assert not list(out.glob(f"{SWAP_PREFIX}*"))
    assert not (out / "ds_config.sft.json").exists()  # v1's artifacts that v2 does not produce
    check_build(out)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_killed_first_compile_is_refused_as_incomplete(builds, tmp_path: Path, monkeypatch, capsys, point: str
                                                      ) -> None:
    out = tmp_path / "build"
    monkeypatch.setenv(CRASH_AT_ENV, point)
    killed = run_cli("compile", str(builds["v2_recipe"]), "--out", str(out), cwd=builds["root"])
    monkeypatch.delenv(CRASH_AT_ENV)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    if point == "compile:done":  # every file was in place; only the clean-up was left
        assert _usable_as(out, tmp_path / "probe") == builds["v2"]
    else:
        for command in ("run", "eval"):
            refused = run_cli(command, str(out), cwd=tmp_path)
            assert refused.returncode == 1 and "Traceback" not in refused.stderr
            errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
            assert errors == [f"error: {out} is incomplete: `recipe compile` was interrupted before it finished "
                              f"writing it; compile the recipe again (recipe compile RECIPE --out {out})"]
            assert not (out / "model").exists()

    code, stderr = _compile_again(builds, out, capsys, monkeypatch)
    assert code == 0, stderr
    assert f"removed the leftovers of an interrupted `recipe compile` from {out}" in stderr
    assert _compiled(out) == builds["v2"]
    assert not list(out.glob(f"{SWAP_PREFIX}*"))


def test_compile_killed_after_varying_delays(builds, tmp_path: Path) -> None:
    """Killed from outside at moments nobody chose, most near the end of the compile, where it
    writes: always one build or the other, whole."""
    seen = set()
    for i, fraction in enumerate((0.5, 0.8, 0.9, 0.95, 1.0, 1.05)):
        delay = fraction * builds["compile_s"]
        out = tmp_path / f"build-{i}"
        shutil.copytree(builds["v1_dir"], out)
        process = subprocess.Popen([sys.executable, "-m", "compiler.cli", "compile", str(builds["v2_recipe"]),
                                    "--out", str(out)], cwd=builds["root"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        files = _usable_as(out, tmp_path / f"probe-{i}")
        assert files in (builds["v1"], builds["v2"])
        seen.add("v2" if files == builds["v2"] else "v1")
        assert _run_outputs(out) == RUN_OUTPUTS
    assert seen  # which ones depends on the machine's speed; each must be whole


def test_compile_and_run_refuse_while_a_run_trains_the_build(builds, tmp_path: Path) -> None:
    out = tmp_path / "build"
    shutil.copytree(builds["v1_dir"], out)
    with open(out / ".run.lock", "a+") as lock:  # what runtime.train holds while it trains
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        compiled = run_cli("compile", str(builds["v2_recipe"]), "--out", str(out), cwd=builds["root"])
        ran = run_cli("run", str(out), cwd=tmp_path)
    assert compiled.returncode == 1 and "Traceback" not in compiled.stderr
    assert f"error: a run is training {out} right now; wait for it to finish, or compile into another " \
           "directory with --out" in compiled.stderr
    assert _compiled(out) == builds["v1"]
    assert ran.returncode == 1 and "Traceback" not in ran.stderr
    assert f"error: another run is training {out} right now" in ran.stderr


def test_the_run_lock_is_the_one_training_holds() -> None:
    import ast

    # One lock for compile, `recipe run` and training: runtime.contract.files.run_lock. Read the
    # modules without importing them (runtime.train imports torch).
    for rel in ("runtime/train.py", "compiler/emission/build.py", "compiler/cli/running.py"):
        tree = ast.parse((REPO / rel).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "runtime.contract.files" for alias in node.names}
        assert "run_lock" in imported, rel
        assert not [node for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value == ".run.lock"], rel


def test_check_build_names_a_missing_build(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not a build directory"):
        check_build(tmp_path / "nothing-here")
