"""model.quantization: a LoRA trained over a 4-bit (or 8-bit) base on the cpu, saved as an adapter,
evaluated over the base quantized again, and exported merged into the dequantized base."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.contract.config import load_runtime_config, unsupported
from tests.conftest import REPO, base_recipe, run_cli, save_tiny_llama, write_json_recipe


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A small Llama with the GPT-2 vocabulary, saved in HF format (fp32)."""
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", hidden=64, intermediate=128,
                           layers=2)


def _recipe(tiny_llama: Path, quantization: str, **changes) -> dict:
    recipe = base_recipe(
        adapter={"kind": "lora", "rank": 8, "targets": "all-linear", "merge": True},
        train={"epochs": None, "max_steps": 10, "micro_batch_size": 8, "learning_rate": 1e-2, "log_every_steps": 1},
        hardware={"device": "cpu", "precision": "bf16"}, **changes)
    del recipe["train"]["epochs"]
    recipe["model"] = {"init": "pretrained", "path": str(tiny_llama), "quantization": quantization}
    return recipe


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO)))


@pytest.mark.slow
def test_a_4bit_lora_trains_saves_evaluates_and_merges(tmp_path: Path, tiny_llama: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = write_json_recipe(tmp_path, _recipe(tiny_llama, "4bit"), name="qlora.json")
    build = tmp_path / "qlora"
    compiled = run_cli("compile", str(recipe), "--out", str(build), cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    trained = _run("runtime.train", str(build), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    losses = [json.loads(line)["loss"] for line in (build / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses

    # what was saved is the adapter alone, for the base as the build names it
    adapter = json.loads((build / "model" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and not (build / "model" / "model.safetensors").exists()
    evaluated = _run("runtime.evaluate", str(build), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    # the held-out loss of the adapter over the base quantized again: below a uniform guess
    assert json.loads((build / "eval.json").read_text())["loss"] < math.log(50257) - 0.2

    # the merged export is a plain bf16 model: the dequantized base plus the adapter, which scores
    # like the quantized base with the adapter on
    merged_config = json.loads((build / "model-merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config
    merged = AutoModelForCausalLM.from_pretrained(build / "model-merged")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    from runtime.core.outputs import starting_model

    config = load_runtime_config(build)
    quantized = PeftModel.from_pretrained(starting_model(config, build, config.stages[0]), build / "model")
    ids = torch.tensor([[50256, 464, 3290, 318, 922, 13]])
    with torch.no_grad():
        expected = quantized(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.slow
def test_a_second_stage_continues_over_the_base_quantized_again(tmp_path: Path, tiny_llama: Path) -> None:
    stages = [{"name": "sft", "kind": "sft", "max_steps": 6},
              {"name": "more", "kind": "sft", "from": "sft", "max_steps": 6,
               "adapter": {"kind": "lora", "rank": 4, "targets": ["q_proj", "v_proj"]}}]
    recipe = write_json_recipe(tmp_path, _recipe(tiny_llama, "4bit", stages=stages), name="chain.json")
    build = tmp_path / "chain"
    assert run_cli("compile", str(recipe), "--out", str(build), cwd=tmp_path).returncode == 0
    trained = _run("runtime.train", str(build), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    records = [json.loads(line) for line in (build / "metrics.jsonl").read_text().splitlines()]
    first = [r["loss"] for r in records if r["stage"] == "sft"]
    second = [r["loss"] for r in records if r["stage"] == "more"]
    # the second stage starts where the first ended: its first loss is near the first stage's last
    assert len(first) == len(second) == 6 and abs(second[0] - first[-1]) < 0.3 and second[-1] < first[0] - 0.3
    # eval attaches the second adapter to the first merged into the base quantized again
    assert json.loads((build / "model" / "adapter_config.json").read_text())["r"] == 4
    evaluated = _run("runtime.evaluate", str(build), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((build / "eval.json").read_text())["loss"] < math.log(50257) - 0.2


@pytest.mark.slow
def test_a_4bit_lora_trains_under_zero3_on_two_processes(tmp_path: Path, tiny_llama: Path) -> None:
    recipe = _recipe(tiny_llama, "4bit")
    recipe["hardware"].update(nproc_per_node=2, zero_stage=3)
    recipe["train"].update(micro_batch_size=2)  # 7 training rows over 2 processes
    del recipe["eval"]
    build = tmp_path / "zero3"
    assert run_cli("compile", str(write_json_recipe(tmp_path, recipe)), "--out", str(build), cwd=tmp_path).returncode == 0
    ran = run_cli("run", str(build), cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    losses = [json.loads(line)["loss"] for line in (build / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert (build / "model" / "adapter_model.safetensors").is_file() and (build / "model-merged" / "config.json").is_file()


@pytest.mark.slow
def test_an_8bit_lora_trains(tmp_path: Path, tiny_llama: Path) -> None:
    recipe = write_json_recipe(tmp_path, _recipe(tiny_llama, "8bit"), name="int8.json")
    build = tmp_path / "int8"
    assert run_cli("compile", str(recipe), "--out", str(build), cwd=tmp_path).returncode == 0
    trained = _run("runtime.train", str(build), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    losses = [json.loads(line)["loss"] for line in (build / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


def test_quantization_without_bitsandbytes_is_refused_with_the_install_hint(tmp_path: Path, tiny_llama: Path,
                                                                              monkeypatch) -> None:
    import importlib.util

    recipe = write_json_recipe(tmp_path, _recipe(tiny_llama, "4bit"))
    build = tmp_path / "b"
    assert run_cli("compile", str(recipe), "--out", str(build), cwd=tmp_path).returncode == 0
    config = load_runtime_config(build)
    assert unsupported(config) == []
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else find_spec(name))
    assert unsupported(config) == ['model.quantization = "4bit" needs bitsandbytes; install the qlora extra '
                                   "(pip install 'recipe[qlora]') or use quantization = \"none\""]


def test_a_reward_model_over_a_quantized_base_is_refused_by_name(tmp_path: Path, tiny_llama: Path) -> None:
    from runtime.core.model import scalar_model
    from runtime.core.outputs import starting_model

    recipe = write_json_recipe(tmp_path, _recipe(tiny_llama, "4bit"))
    build = tmp_path / "b"
    assert run_cli("compile", str(recipe), "--out", str(build), cwd=tmp_path).returncode == 0
    config = load_runtime_config(build)
    reward = config.model_copy(update={"stages": (config.stages[0].model_copy(update={"kind": "reward"}),)})
    assert any("reward model or critic is built from the weights of a causal model" in m for m in unsupported(reward))
    # the reason: a sequence-classification model cannot take a quantized causal model's weights
    with pytest.raises(Exception):
        scalar_model(starting_model(config, build, config.stages[0]), seed=0)
