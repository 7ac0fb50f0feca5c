"""`recipe compile`: the build directory, its determinism, and what it records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from compiler.diagnostics import RecipeError
from compiler.emission.build import compile_recipe, write_build
from tests.conftest import REPO, base_recipe, run_cli, write_json_recipe

EXAMPLE = REPO / "specs" / "examples" / "tweet-sentiment.toml"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_compiling_twice_is_byte_identical(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        result = run_cli("compile", "specs/examples/tweet-sentiment.toml", "--out", str(out))
        assert result.returncode == 0, result.stderr
    a, b = _tree(first), _tree(second)
    assert set(a) == {
        "data/tweets/heldout.jsonl", "data/tweets/train.jsonl", "ds_config.json", "job.slurm", "launch.sh",
        "manifest.json", "plan.json", "plan.md",
        "runtime.json", "tokenizer/tokenizer.json",
    }
    assert a == b
    # No absolute paths, user names or host names leak into artifacts.
    for rel, content in a.items():
        text = content.decode()
        leaks = [str(REPO), str(tmp_path), str(Path.home())]
        if rel != "tokenizer/tokenizer.json":  # a vocabulary holds every short string there is
            leaks.append(os.uname().nodename)
        for leak in leaks:
            assert leak not in text, f"{leak!r} found in {rel}"


def test_example_plan_records_the_budget_and_split() -> None:
    build = compile_recipe(EXAMPLE)
    plan = build.plan
    runtime = json.loads(build.files["runtime.json"])
    # n_positions is the measured budget, and the runtime model uses exactly that
    tweets = plan["data"]["tweets"]
    budget = tweets["tokens"]["max_total_tokens"]
    assert plan["model"]["n_positions"] == budget == runtime["model"]["n_positions"]
    assert runtime["data"]["tweets"]["max_total_tokens"] == budget
    derived = {d["key"]: d for d in plan["derived"]}
    assert "99%" in derived["model.n_positions"]["reason"]
    # VADER tweets at +-0.5: 2,300 positive / 1,062 negative / 838 neutral (documented counts)
    labels = tweets["labels"]
    totals = {k: labels["train"][k] + labels["heldout"][k] for k in labels["train"]}
    assert totals == {"positive": 2300, "negative": 1062, "neutral": 838}
    assert tweets["split"]["train"] + tweets["split"]["heldout"] == 4200
    assert tweets["split"]["heldout"] == 840
    # every example fits the budget; the label (completion) is intact
    for name in ("data/tweets/train.jsonl", "data/tweets/heldout.jsonl"):
        for line in build.files[name].decode().splitlines():
            record = json.loads(line)
            assert len(record["prompt"]) + len(record["completion"]) <= budget
            assert len(record["completion"]) == 1
    assert tweets["tokens"]["truncated_examples"] > 0
    assert plan["summary"].startswith("Plan: 1 stage, ")
    assert build.files["plan.md"].decode().rstrip().endswith(plan["summary"])
    assert runtime["schema_version"] == 2


def test_truncated_tweets_are_prefixes_and_labels_intact() -> None:
    from tokenizers import Tokenizer

    build = compile_recipe(EXAMPLE)
    tokenizer = Tokenizer.from_str(build.files["tokenizer/tokenizer.json"].decode())
    budget = build.plan["data"]["tweets"]["tokens"]["max_total_tokens"]
    shortened = 0
    for line in build.files["data/tweets/train.jsonl"].decode().splitlines():
        record = json.loads(line)
        prompt = tokenizer.decode(record["prompt"])
        assert prompt.startswith("Instruction: Classify the sentiment")
        assert prompt.endswith("\nOutput:")
        assert tokenizer.decode(record["completion"]) == " " + record["label"]
        if len(record["prompt"]) + 1 == budget:
            shortened += 1
    assert shortened > 0


def test_recompile_keeps_run_outputs_and_removes_stale_artifacts(tmp_path: Path) -> None:
    recipe = write_json_recipe(tmp_path, base_recipe())
    out = tmp_path / "build"
    write_build(compile_recipe(recipe), out)
    (out / "eval.json").write_text("{}")
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["old-artifact.txt"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "old-artifact.txt").write_text("stale")
    write_build(compile_recipe(recipe), out)
    assert (out / "eval.json").read_text() == "{}"
    assert (out / "model" / "config.json").exists()
    assert not (out / "old-artifact.txt").exists()


def test_a_stage_whose_epoch_takes_no_step_is_refused_with_the_fix(tmp_path: Path) -> None:
    # 10 rows, 3 held out: 7 training rows make 2 micro-batches of 4, fewer than 4 processes.
    recipe = write_json_recipe(tmp_path, base_recipe(hardware={"nproc_per_node": 4}))
    with pytest.raises(RecipeError) as raised:
        compile_recipe(recipe)
    [diagnostic] = raised.value.diagnostics
    assert diagnostic.message == (
        'stage "sft" would take 0 steps per epoch: 7 training rows of data set "tweets" make 2 micro-batches '
        "of 4, fewer than the 4 processes that each need one")
    assert diagnostic.help == ("set micro_batch_size = 1 or less, or train on fewer processes "
                               "(hardware.nproc_per_node x hardware.nodes = 4)")
    assert diagnostic.key == "train.micro_batch_size"
    result = run_cli("compile", str(recipe), "--out", str(tmp_path / "build"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert 'error: stage "sft" would take 0 steps per epoch' in result.stderr
    assert not (tmp_path / "build").exists()


def test_a_stage_with_one_micro_batch_per_process_plans_its_steps(tmp_path: Path) -> None:
    recipe = write_json_recipe(tmp_path, base_recipe(hardware={"nproc_per_node": 2}))
    build = compile_recipe(recipe)
    assert [s["steps"] for s in build.plan["stages"]] == [1]


def test_a_stage_with_no_training_rows_is_refused(tmp_path: Path) -> None:
    recipe = base_recipe(stages=[{"name": "sft", "kind": "sft", "data": "tweets", "micro_batch_size": 2}])
    recipe["data"]["tweets"]["max_rows"] = 1
    recipe["data"]["tweets"]["split"] = {"heldout_fraction": 0.6, "seed": 1}
    with pytest.raises(RecipeError, match='stage "sft" has no training rows: data set "tweets" kept none'):
        compile_recipe(write_json_recipe(tmp_path, recipe))
