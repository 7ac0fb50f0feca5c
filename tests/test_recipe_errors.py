"""Bad recipes: every error at once, located, with a fix; exit code 1 and no traceback."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from compiler.diagnostics import RecipeError
from compiler.loading.loader import load_recipe
from compiler.rules.validate import validate
from tests.conftest import REPO, base_recipe, run_cli, write_json_recipe

BAD_TOML = textwrap.dedent(
    """\
    name = "bad"

    [model]
    init = "scratch"
    n_embd = 128
    n_layer = "four"
    n_head = 4

    [tokenizer]
    asset = "gpt2-bpe"
    eos_token = "<|endoftext|>"

    [data.tweets]
    source = { asset = "vader-tweets" }
    format = "columns"

    [template]
    prompt = "Input: {{ text }}"
    completion = " {{ label }}"

    [[stages]]
    name = "sft"
    kind = "sft"
    learnig_rate = 2e-5

    [eval]
    label_field = "label"
    """
)


def test_unknown_key_and_wrong_type_are_reported_together_with_positions(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_TOML)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    by_key = {d.key: d for d in caught.value.diagnostics}
    assert set(by_key) == {"model.n_layer", "stages.0.learnig_rate"}
    typo = by_key["stages.0.learnig_rate"]
    assert (typo.line, typo.column) == (24, 1)
    assert typo.message == 'unknown key "learnig_rate" in [stages.0]'
    assert typo.help == 'did you mean "learning_rate"?'
    wrong = by_key["model.n_layer"]
    assert (wrong.line, wrong.column) == (6, 1)
    assert "valid integer" in wrong.message


def test_cli_error_snapshot_exit_1_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_TOML)
    result = run_cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    expected = textwrap.dedent(
        """\
        error: model.n_layer = "four": should be a valid integer
          --> bad.toml:6:1
           | n_layer = "four"

        error: unknown key "learnig_rate" in [stages.0]
          --> bad.toml:24:1
           | learnig_rate = 2e-5
           = key: stages.0.learnig_rate
           = help: did you mean "learning_rate"?

        2 errors
        """
    )
    assert result.stderr == expected
    assert len(result.stderr.splitlines()) < 25  # one screen


def test_compile_of_bad_recipe_exits_1_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_TOML)
    result = run_cli("compile", str(path), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_invalid_toml_syntax_points_at_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\n[model\nn_embd = 1\n')
    result = run_cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert "invalid TOML" in result.stderr
    assert "broken.toml:2:" in result.stderr


def test_json_recipe_errors_have_positions(tmp_path: Path) -> None:
    recipe = base_recipe()
    recipe["train"]["epochz"] = 3
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe, indent=2))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    (diag,) = caught.value.diagnostics
    lines = path.read_text().splitlines()
    assert '"epochz"' in lines[diag.line - 1]
    assert diag.help == 'did you mean "epochs"?'


def _set(recipe: dict, dotted: str, value) -> dict:
    node = recipe
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[parts[-1]] = value
    return recipe


def test_enum_typo_suggests_the_value(tmp_path: Path) -> None:
    path = write_json_recipe(tmp_path, _set(base_recipe(), "data.tweets.file_format", "tsvv"))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    (diag,) = caught.value.diagnostics
    assert diag.key == "data.tweets.file_format"
    assert diag.help == 'did you mean "tsv"?'


@pytest.mark.parametrize(
    ("changes", "key", "fragment"),
    [
        ({"model.n_embd": 30, "model.n_head": 4}, "model", "divisible by n_head"),
        ({"name": "Has Spaces"}, "name", "lowercase"),
        ({"data.tweets.source": {"asset": "vader-tweets", "path": "x.tsv"}}, "data.tweets.source", "exactly one"),
        ({"hardware.device": "cpu", "hardware.precision": "fp16"}, "hardware", "needs a GPU"),
    ],
)
def test_schema_rules_fail(tmp_path: Path, changes: dict, key: str, fragment: str) -> None:
    recipe = base_recipe()
    for dotted, value in changes.items():
        _set(recipe, dotted, value)
    path = write_json_recipe(tmp_path, recipe)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert any(d.key == key and fragment in d.message for d in caught.value.diagnostics), caught.value


@pytest.mark.parametrize(
    ("changes", "key", "fragment"),
    [
        ({"template.prompt": "Input: {{ txt }}"}, "template.prompt", 'no field "txt"'),
        ({"eval.label_field": "sentiment"}, "eval.label_field", "not a field"),
        ({"tokens.truncatable": ["label"]}, "tokens.truncatable", "never truncated"),
        ({"tokenizer.asset": "gpt2-bpee"}, "tokenizer.asset", "not a pinned asset"),
        ({"data.tweets.source": {"path": "missing.tsv"}}, "data.tweets.source.path", "matches no file"),
        ({"model.n_positions": 16, "tokens.max_total": 32}, "tokens.max_total", "exceeds"),
        ({"template.prompt": "{% if %}"}, "template.prompt", "syntax error"),
    ],
)
def test_cross_field_rules_fail(tmp_path: Path, changes: dict, key: str, fragment: str) -> None:
    recipe = base_recipe()
    for dotted, value in changes.items():
        _set(recipe, dotted, value)
    path = write_json_recipe(tmp_path, recipe)
    with pytest.raises(RecipeError) as caught:
        validate(path)
    assert any(d.key == key and fragment in d.message for d in caught.value.diagnostics), caught.value


def test_base_recipe_passes(tiny_recipe: Path) -> None:
    loaded, warnings = validate(tiny_recipe)
    assert loaded.recipe.name == "tiny"
    assert warnings == []


def test_every_shipped_example_validates() -> None:
    examples = sorted((Path(__file__).resolve().parent.parent / "specs" / "examples").glob("*.toml"))
    assert examples
    for path in examples:
        validate(path)


def test_validate_imports_no_heavy_library() -> None:
    import subprocess
    import sys

    examples = sorted(str(p.relative_to(REPO)) for p in (REPO / "specs" / "examples").glob("*.toml"))
    code = (
        "import sys; from compiler.cli import main; "
        f"rc = main(['validate', *{examples!r}]); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'tokenizers', 'peft') if m in sys.modules); "
        "print(rc, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert len(examples) >= 5
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stderr


def _lora_recipe(tmp_path: Path, hub: str, **lora) -> Path:
    recipe = base_recipe()
    recipe["model"] = {"init": "pretrained", "hub": hub}
    recipe["adapter"] = {"kind": "lora", "targets": ["q_proj"], **lora}
    return write_json_recipe(tmp_path, recipe)


@pytest.mark.parametrize(("hub", "lora", "fragment", "help_fragment"), [
    ("Qwen/Qwen2-7B-Instruct", {"expert_targets": ["down_proj"]}, "has no routed experts", "remove expert_targets"),
    ("mistralai/Mixtral-8x7B-v0.1", {"expert_targets": ["gate_proj"]}, "not a routed-expert tensor",
     'did you mean "gate_up_proj"'),
    ("mistralai/Mixtral-8x7B-v0.1", {"targets": ["q_proj", "gate_up_proj"]}, "3-D tensor",
     'expert_targets = ["gate_up_proj"]'),
])
def test_expert_targets_are_checked_against_the_model(tmp_path: Path, hub: str, lora: dict, fragment: str,
                                                      help_fragment: str) -> None:
    with pytest.raises(RecipeError) as caught:
        validate(_lora_recipe(tmp_path, hub, **lora))
    [problem] = caught.value.diagnostics
    assert fragment in problem.message and help_fragment in (problem.help or ""), problem


def test_expert_targets_need_lora_without_dropout(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        validate(_lora_recipe(tmp_path, "mistralai/Mixtral-8x7B-v0.1", expert_targets=["down_proj"], dropout=0.1))
    assert any("set dropout = 0" in d.message for d in caught.value.diagnostics)
    validate(_lora_recipe(tmp_path, "mistralai/Mixtral-8x7B-v0.1", expert_targets=["gate_up_proj", "down_proj"]))
