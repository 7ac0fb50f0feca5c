"""`--set key=none` removes a key, so an override can switch a choice the file made."""

from __future__ import annotations

from compiler.loading.loader import load_recipe
from compiler.loading.overrides import parse_override
from tests.conftest import REPO, run_cli

QWEN = REPO / "specs" / "examples" / "qwen2-7b-lora.toml"  # sets train.epochs = 5


def test_max_steps_instead_of_the_files_epochs() -> None:
    refused = run_cli("validate", str(QWEN), "--set", "train.max_steps=30")
    assert refused.returncode == 1 and "give epochs or max_steps, not both" in refused.stderr
    switched = run_cli("validate", str(QWEN), "--set", "train.epochs=none", "--set", "train.max_steps=30")
    assert switched.returncode == 0, switched.stderr
    train = load_recipe(QWEN, [parse_override("train.epochs=none"), parse_override("train.max_steps=30")]).recipe.train
    assert train.max_steps == 30 and "epochs" not in train.model_fields_set


def test_removed_keys_take_their_default_and_quoted_none_is_text() -> None:
    plain = load_recipe(QWEN).recipe
    assert plain.train.learning_rate != 5e-4
    removed = load_recipe(QWEN, [parse_override("train.learning_rate=none")]).recipe
    assert removed.train.learning_rate == 5e-4  # the schema's default
    assert load_recipe(QWEN, [parse_override("budget.nothing.here=none")]).recipe == plain  # nothing to remove
    quoted = run_cli("validate", str(QWEN), "--set", 'hardware.precision="none"')
    assert quoted.returncode == 1 and 'hardware.precision = "none" is not one of' in quoted.stderr


def test_removing_a_required_key_is_reported_at_the_command_line() -> None:
    result = run_cli("validate", str(QWEN), "--set", "name=none")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--set name=none" in result.stderr
