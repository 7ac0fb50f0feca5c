"""`recipe diff`: a recipe change as plan deltas, against another file or a git revision."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import base_recipe, run_cli, write_json_recipe


def test_diff_of_two_recipes_shows_settings_and_plan_deltas(tmp_path: Path) -> None:
    old = write_json_recipe(tmp_path, base_recipe(), "old.json")
    new_recipe = base_recipe(model={"n_embd": 64, "n_head": 4})
    new = write_json_recipe(tmp_path, new_recipe, "new.json")
    result = run_cli("diff", str(old), str(new), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("Legend: + added, - removed, ~ changed")
    assert "~ model.n_embd: 32 -> 64" in out and "~ model.n_head: 2 -> 4" in out
    assert "~ sft: trainable params:" in out and "~ sft: peak memory:" in out
    assert "before: Plan:" in out and "after:  Plan:" in out


def test_added_and_removed_stages(tmp_path: Path) -> None:
    old = write_json_recipe(tmp_path, base_recipe(), "old.json")
    two = base_recipe(stages=[{"name": "sft", "kind": "sft"}, {"name": "more", "kind": "sft", "from": "sft"}])
    new = write_json_recipe(tmp_path, two, "new.json")
    out = run_cli("diff", str(old), str(new), "--markdown", cwd=tmp_path).stdout
    assert out.startswith("### recipe diff")
    assert "| `+` | stage more | - | sft |" in out
    assert "| `+` | `stages.more.kind` | - | sft |" in out
    out = run_cli("diff", str(new), str(old), cwd=tmp_path).stdout
    assert "- stage more: sft -> -" in out


def test_identical_recipes_have_no_changes(tmp_path: Path) -> None:
    a = write_json_recipe(tmp_path, base_recipe(), "a.json")
    b = write_json_recipe(tmp_path, base_recipe(), "b.json")
    assert run_cli("diff", str(a), str(b), cwd=tmp_path).stdout == "No changes: the recipes plan the same run.\n"


def test_diff_against_a_git_revision(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "ci@example.com")
    git("config", "user.name", "ci")
    path = write_json_recipe(tmp_path, base_recipe(), "r.json")
    git("add", "r.json")
    git("commit", "-qm", "recipe")
    changed = base_recipe(train={"epochs": 3})
    path.write_text(json.dumps(changed, indent=2))
    result = run_cli("diff", "r.json", "--against", "HEAD", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "~ train.epochs: 1 -> 3" in result.stdout
    assert "~ sft: train tokens:" in result.stdout
    assert not list(tmp_path.glob(".r.at-revision*"))  # the old version is not left behind
    bad = run_cli("diff", "r.json", "--against", "no-such-rev", cwd=tmp_path)
    assert bad.returncode == 1 and "cannot read r.json at no-such-rev" in bad.stderr


def test_the_shipped_hook_and_workflow_run_the_review_commands() -> None:
    import yaml

    from tests.conftest import REPO

    hooks = {h["id"]: h for h in yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())}
    assert hooks["recipe-check"]["entry"] == "recipe check"
    assert hooks["recipe-validate"]["entry"] == "recipe validate"
    workflow = yaml.safe_load((REPO / "examples" / "ci" / "recipe-review.yml").read_text())
    steps = "\n".join(step.get("run", "") for step in workflow["jobs"]["review"]["steps"])
    assert "recipe check" in steps and "recipe diff" in steps and "--markdown" in steps


def test_lora_rank_8_vs_64_shows_the_predicted_memory_and_cost_deltas(tmp_path: Path) -> None:
    import tomllib

    from compiler.emission.build import compile_recipe
    from tests.conftest import REPO

    (tmp_path / "data").symlink_to(REPO / "specs" / "examples" / "data")
    base = tomllib.loads((REPO / "specs" / "examples" / "qwen2-7b-lora.toml").read_text())
    paths = {}
    for rank in (8, 64):
        recipe = json.loads(json.dumps(base))
        recipe["adapter"]["rank"] = rank
        paths[rank] = write_json_recipe(tmp_path, recipe, f"r{rank}.json")
    plans = {rank: compile_recipe(path).plan for rank, path in paths.items()}
    out = run_cli("diff", "r8.json", "r64.json", cwd=tmp_path).stdout
    # q_proj 3584 -> 3584 and v_proj 3584 -> 512 in 28 layers: (64 - 8) x 28 x (7168 + 4096) more parameters
    assert f"~ sft: trainable params: 2,523,136 -> 20,185,088  +{56 * 28 * 11264:,} (+700.0%)" in out
    before, after = (plans[r]["stages"][0] for r in (8, 64))
    for label, key in (("peak memory", "peak_gib"), ("headroom", "headroom_gib")):
        a, b = before["memory"][key], after["memory"][key]
        assert f"~ sft: {label}: {a:,.3f}".rstrip("0").rstrip(".") in out
        assert f"{b:,.3f}".rstrip("0").rstrip(".") in out
    cost_before, cost_after = before["compute"]["cost_usd"], after["compute"]["cost_usd"]
    # a cost line appears exactly when the estimator's cost moved (LoRA's extra FLOPs are small)
    assert ("~ sft: cost:" in out) == (cost_before != cost_after)
