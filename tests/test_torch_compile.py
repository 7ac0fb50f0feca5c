"""train.compile: torch.compile of each decoder block trains like the eager model and reports the
first step's compile time apart from the steady-state speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, base_recipe, run_cli, write_json_recipe


def _train(tmp_path: Path, name: str, **train) -> Path:
    recipe = base_recipe(name=name, model={"n_embd": 32, "n_layer": 2, "n_head": 2})
    recipe["train"] = {key: value for key, value in recipe["train"].items() if key != "epochs"}
    recipe["train"].update(micro_batch_size=1, max_steps=3, log_every_steps=1, **train)
    path = write_json_recipe(tmp_path, recipe, name=f"{name}.json")
    build = tmp_path / name
    compiled = run_cli("compile", str(path), "--out", str(build), cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    trained = subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=REPO, capture_output=True,
                             text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=600)
    assert trained.returncode == 0, trained.stderr
    return build


def _losses(build: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (build / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones_and_report_the_compile_time(tmp_path: Path) -> None:
    from runtime.report import build_run_report

    eager = _train(tmp_path, "eager")
    compiled = _train(tmp_path, "compiled", compile=True)
    eager_losses, compiled_losses = _losses(eager), _losses(compiled)
    assert len(compiled_losses) == len(eager_losses) == 3
    # inductor fuses and reorders float operations: equal up to rounding, not bit for bit
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    compiled_stage = build_run_report(compiled)["stages"][0]
    eager_stage = build_run_report(eager)["stages"][0]
    # compiling a block takes far longer than a step of this tiny model does
    assert compiled_stage["compile_s"] > 1.0
    assert compiled_stage["steady_tokens_per_s"] > 0
    assert "compile_s" not in eager_stage and eager_stage["steady_tokens_per_s"] > 0


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_compile_is_refused_by_name_for_the_stages_that_generate(kind: str) -> None:
    from runtime.contract import config as contract

    golden = json.loads((REPO / "tests" / "golden" / "tweet-sentiment" / "runtime.json").read_text())
    for compiled, refused in ((True, 1), (False, 0)):
        stage = {**golden["stages"][0], "kind": kind, "compile": compiled}
        config = contract.RuntimeConfig.model_validate({**golden, "stages": [stage]})
        lines = [line for line in contract.unsupported(config) if "compile = true" in line]
        assert len(lines) == refused
        assert all(line.startswith(f'stage "sft" is {kind}') and "recompiles" in line for line in lines)


@pytest.mark.parametrize(("zero", "adapter", "refused"), [(3, "full", "ZeRO-3"), (0, "prefix", "prefix adapter"),
                                                         (2, "full", None), (0, "lora", None)])
def test_compile_under_zero3_or_with_prefixes_is_refused_by_name(zero: int, adapter: str, refused: str | None) -> None:
    from runtime.contract import config as contract

    golden = json.loads((REPO / "tests" / "golden" / "tweet-sentiment" / "runtime.json").read_text())
    stage = {**golden["stages"][0], "compile": True, "adapter": {"kind": adapter, "params": {}}}
    config = contract.RuntimeConfig.model_validate({**golden, "stages": [stage],
                                                    "hardware": {**golden["hardware"], "zero_stage": zero}})
    lines = [line for line in contract.unsupported(config) if "compile = true" in line]
    assert lines == [] if refused is None else (len(lines) == 1 and refused in lines[0])
