"""A recipe cannot steer writes outside its build directory, and secrets in the environment never
reach an artifact or a log."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import base_recipe, run_cli, write_json_recipe

HOSTILE_NAMES = ["..", "../escape", "/etc", "a/b", ".hidden", "-rf", "a\\b", "x\x00y", "~root"]


@pytest.mark.parametrize("where", ["name", "data set", "stage"])
@pytest.mark.parametrize("hostile", HOSTILE_NAMES)
def test_names_that_become_paths_are_refused(tmp_path: Path, where: str, hostile: str) -> None:
    recipe = base_recipe()
    if where == "name":
        recipe["name"] = hostile
    elif where == "data set":
        recipe["data"][hostile] = recipe["data"].pop("tweets")
    else:
        recipe["stages"][0]["name"] = hostile
    path = write_json_recipe(tmp_path, recipe)
    result = run_cli("compile", str(path), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "must be lowercase letters, digits" in result.stderr or "should be lowercase letters" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.json"]  # nothing was written anywhere


# Tracker credentials are planted too: the run reports to all three trackers (W&B offline).
TRACKER_SECRETS = {"WANDB_API_KEY": "FAKEwandbKEY0123456789abcdef0123456789ab",
                   "MLFLOW_TRACKING_TOKEN": "FAKEmlflowTOKEN0123456789abcdef"}


@pytest.mark.slow
def test_a_planted_secret_never_reaches_an_artifact_or_a_log(tmp_path: Path, monkeypatch) -> None:
    secret = "hf_FAKEsecret0123456789abcdefXYZ"
    recipe = base_recipe(name="secret", launch={"env": ["HF_TOKEN", *TRACKER_SECRETS]},
                         train={"report_to": ["tensorboard", "wandb", "mlflow"], "eval_every_steps": 5})
    path = write_json_recipe(tmp_path, recipe)
    monkeypatch.setenv("HF_TOKEN", secret)  # the CLI subprocesses inherit it, as a job's would
    for name, value in TRACKER_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    compiled = run_cli("compile", str(path), "--out", str(tmp_path / "build"), cwd=tmp_path)
    ran = run_cli("run", str(tmp_path / "build"), cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "HF_TOKEN" in (tmp_path / "build" / "launch.sh").read_text()  # referenced by name
    files = [p for p in (tmp_path / "build").rglob("*") if p.is_file()]
    assert len(files) > 20  # plan, launch, data, model, metrics, reports, eval
    assert any("tfevents" in p.name for p in files) and any(p.suffix == ".wandb" for p in files)
    assert (tmp_path / "build" / "mlruns").is_dir()
    for value in (secret, *TRACKER_SECRETS.values()):
        for file in files:
            assert value.encode() not in file.read_bytes(), file
        for text in (compiled.stdout, compiled.stderr, ran.stdout, ran.stderr):
            assert value not in text
