"""`recipe check`: [budget] limits and device fit, for CI and pre-commit hooks."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import REPO, run_cli

QWEN = "specs/examples/qwen2-7b-lora.toml"


def test_a_plan_within_its_budget_passes() -> None:
    result = run_cli("check", QWEN, "--set", "budget.max_usd=5", "--set", "budget.max_gpu_hours=1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {QWEN}: Plan: 1 stage")


def test_each_exceeded_limit_is_reported_with_where_it_was_set(tmp_path: Path) -> None:
    recipe = (REPO / QWEN).read_text() + "\n[budget]\nmax_usd = 0.05\nmax_gpu_hours = 0.01\nmin_memory_headroom_gib = 60\n"
    (tmp_path / "data").symlink_to(REPO / "specs" / "examples" / "data")
    path = tmp_path / "_check_test.toml"
    path.write_text(recipe)
    result = run_cli("check", str(path), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "more than budget.max_usd = 0.05" in result.stderr
    assert "more than budget.max_gpu_hours = 0.01" in result.stderr
    assert "less than budget.min_memory_headroom_gib = 60" in result.stderr
    assert "_check_test.toml:" in result.stderr and "3 errors" in result.stderr


def test_a_stage_that_does_not_fit_fails_with_a_suggestion() -> None:
    result = run_cli("check", QWEN, "--set", "hardware.gpu=l4-24gb")
    assert result.returncode == 1
    assert 'stage "sft" needs' in result.stderr and "GiB available" in result.stderr
    assert "help: for example:" in result.stderr
