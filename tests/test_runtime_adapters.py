"""Every stage/adapter combination the runtime trains, on tiny models: the loss falls, the planned
parameters (and only those) train, and the saved artifacts reload with plain transformers/peft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.contract.config import load_runtime_config
from runtime.core.data import IGNORE_INDEX, TrainRow, collate_rows, read_training_rows
from tests.conftest import REPO, base_recipe, run_cli, save_tiny_llama, write_json_recipe


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A small Llama (grouped-query attention) with the GPT-2 vocabulary, saved in HF format."""
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", hidden=32, intermediate=64,
                           layers=3)


def _build(tmp_path: Path, name: str, *, model: dict | None = None, adapter: dict | None = None,
           stages: list | None = None, train: dict | None = None, template: dict | None = None,
           hardware: dict | None = None) -> Path:
    recipe = base_recipe(name=name, train={"epochs": None, "max_steps": 12, "micro_batch_size": 8,
                                           "learning_rate": 3e-3, "log_every_steps": 1, **(train or {})})
    del recipe["train"]["epochs"]
    del recipe["eval"]
    if model is not None:
        recipe["model"] = model
    if adapter is not None:
        recipe["adapter"] = adapter
    if stages is not None:
        recipe["stages"] = stages
    if template is not None:
        recipe["template"] = template
    if hardware is not None:
        recipe["hardware"] = hardware
    path = write_json_recipe(tmp_path, recipe, name=f"{name}.json")
    build = tmp_path / name
    result = run_cli("compile", str(path), "--out", str(build), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trained = subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=tmp_path, capture_output=True,
                             text=True, env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO)))
    assert trained.returncode == 0, trained.stderr
    return build


def _losses(build: Path, stage: str = "sft") -> list[float]:
    records = [json.loads(line) for line in (build / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["stage"] == stage]


def _fell(losses: list[float]) -> bool:
    """The mean of the last three logged losses is clearly below the mean of the first three."""
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1


def _report(build: Path) -> dict:
    return json.loads((build / "train_report.json").read_text())["stages"]


def _pretrained(path: Path) -> dict:
    return {"init": "pretrained", "path": str(path)}


@pytest.mark.slow
def test_full_finetune_of_a_pretrained_llama_reloads(tmp_path: Path, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    build = _build(tmp_path, "llama-full", model=_pretrained(tiny_llama))
    assert _fell(_losses(build))
    report = _report(build)[0]
    assert report["params_trainable"] == report["params_total"]
    plan = json.loads((build / "plan.json").read_text())["stages"][0]
    assert report["params_total"] == plan["params"]["total"]  # the compiler's count is the real model's
    reloaded = AutoModelForCausalLM.from_pretrained(build / "model")
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert (build / "model" / "tokenizer.json").is_file() and (build / "model" / "recipe_template.json").is_file()


@pytest.mark.slow
def test_lora_trains_only_the_adapter_and_reloads_and_merges(tmp_path: Path, tiny_llama: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = {"kind": "lora", "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "merge": True}
    build = _build(tmp_path, "llama-lora", model=_pretrained(tiny_llama), adapter=adapter, train={"learning_rate": 1e-2})
    assert _fell(_losses(build))
    report = _report(build)[0]
    # by hand: 3 layers x (q: 4x32 + 32x4, v: 4x32 + 16x4 with 2 kv heads of width 8)
    assert report["params_trainable"] == 3 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4)) == 1344
    plan = json.loads((build / "plan.json").read_text())["stages"][0]
    assert plan["params"]["trainable"] == 1344
    assert (build / "model" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with_adapter = PeftModel.from_pretrained(base, build / "model").eval()
    merged = AutoModelForCausalLM.from_pretrained(build / "model-merged").eval()
    ids = torch.tensor([[15496, 995, 0, 50256]])
    torch.testing.assert_close(with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    untouched = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert not torch.allclose(untouched(input_ids=ids).logits, merged(input_ids=ids).logits)


@pytest.mark.slow
def test_prefix_tuning_trains_and_reloads(tmp_path: Path, tiny_llama: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = {"kind": "prefix", "num_virtual_tokens": 4}
    build = _build(tmp_path, "llama-prefix", model=_pretrained(tiny_llama), adapter=adapter,
                   train={"learning_rate": 1e-1, "max_steps": 16})
    assert _fell(_losses(build))
    # by hand: 4 virtual tokens x 3 layers x 2 (key, value) x kv width (2 heads x 8)
    assert _report(build)[0]["params_trainable"] == 4 * 3 * 2 * 16 == 384
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), build / "model")
    assert model.active_peft_config.num_virtual_tokens == 4


@pytest.mark.slow
def test_freeze_trains_the_last_block_only(tmp_path: Path, tiny_llama: Path) -> None:
    from safetensors.torch import load_file

    adapter = {"kind": "freeze", "trainable_layers": 1}
    build = _build(tmp_path, "llama-freeze", model=_pretrained(tiny_llama), adapter=adapter)
    assert _fell(_losses(build))
    # by hand, one Llama block: q 32x32, k 16x32, v 16x32, o 32x32, gate/up 64x32, down 32x64, 2 norms of 32
    block = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 2 * 64 * 32 + 32 * 64 + 2 * 32
    assert _report(build)[0]["params_trainable"] == block == 9280
    before, after = load_file(tiny_llama / "model.safetensors"), load_file(build / "model" / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.layers.2.") for name in changed)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_losses(tmp_path: Path, tiny_llama: Path) -> None:
    """Recomputing activations in the backward pass changes memory, not arithmetic."""
    adapter = {"kind": "lora", "rank": 4, "targets": ["q_proj", "v_proj"]}
    losses = {}
    for checkpointing in (False, True):
        build = _build(tmp_path, f"ckpt-{str(checkpointing).lower()}", model=_pretrained(tiny_llama), adapter=adapter,
                       train={"max_steps": 6, "learning_rate": 1e-2},
                       hardware={"device": "cpu", "gradient_checkpointing": checkpointing})
        assert json.loads((build / "runtime.json").read_text())["hardware"]["gradient_checkpointing"] is checkpointing
        losses[checkpointing] = _losses(build)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][-1] < losses[True][0]


@pytest.mark.slow
def test_pretrain_then_sft_chain_supervises_every_token_then_the_completion(tmp_path: Path) -> None:
    stages = [{"name": "pretrain", "kind": "pretrain", "max_steps": 10},
              {"name": "sft", "kind": "sft", "from": "pretrain", "max_steps": 6}]
    build = _build(tmp_path, "chain", stages=stages, train={"max_steps": None, "epochs": 1})
    assert _fell(_losses(build, "pretrain"))
    reports = _report(build)
    assert [r["stage"] for r in reports] == ["pretrain", "sft"]
    assert (build / "stages" / "pretrain" / "model" / "model.safetensors").is_file()
    # the chain is resumable: running again skips both finished stages
    again = subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=REPO, capture_output=True,
                           text=True)
    assert again.returncode == 0
    assert again.stderr.count("already finished") == 2


def test_prompt_is_supervised_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"line": 3, "prompt": [1, 2, 3], "completion": [4, 5], "label": "x"}) + "\n"
                    + json.dumps({"line": 4, "input_ids": [7, 8, 9], "labels": [-100, 8, 9]}) + "\n")
    completion_only = read_training_rows(path)
    assert completion_only[0] == TrainRow((1, 2, 3, 4, 5), (IGNORE_INDEX,) * 3 + (4, 5), 3)
    assert completion_only[1] == TrainRow((7, 8, 9), (-100, 8, 9), 4)  # chat rows keep their own labels
    everything = read_training_rows(path, supervise_prompt=True)
    assert everything[0].labels == (1, 2, 3, 4, 5)
    batch = collate_rows(completion_only, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]]
    assert batch["labels"].tolist()[1] == [-100, 8, 9, -100, -100]
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 0, 0]


def test_token_loss_with_a_prefix_equals_peft_forward() -> None:
    """The loss path that skips peft's forward (to apply the LM head only where supervised) gives
    exactly peft's own loss for prefix tuning."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from runtime.core.losses import TokenLoss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                        num_virtual_tokens=3)).eval()
    rows = [TrainRow((5, 6, 7, 8), (-100, -100, 7, 8), 1), TrainRow((9, 10), (-100, 10), 2)]
    batch = collate_rows(rows, pad_id=0)
    loss_sum, n = TokenLoss(model)(**batch)
    reference = model(**batch).loss
    assert int(n) == 3
    torch.testing.assert_close(loss_sum / n, reference)


def test_runtime_config_of_an_adapter_build_carries_the_planned_settings(tmp_path: Path, tiny_llama: Path) -> None:
    recipe = base_recipe(name="cfg")
    recipe["model"] = _pretrained(tiny_llama)
    recipe["adapter"] = {"kind": "lora", "rank": 2, "targets": ["q_proj"]}
    path = write_json_recipe(tmp_path, recipe)
    result = run_cli("compile", str(path), "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = load_runtime_config(tmp_path / "b")
    assert config.stages[0].adapter.kind == "lora" and config.stages[0].adapter.params["rank"] == 2
    assert config.model.init == "pretrained" and config.model.family == "llama"


@pytest.mark.slow
def test_lora_on_routed_experts_trains_one_pair_per_expert_as_planned(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=50257, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, bos_token_id=50256, eos_token_id=50256)
    folder = tmp_path / "tiny-mixtral"
    MixtralForCausalLM(config).save_pretrained(folder)
    adapter = {"kind": "lora", "rank": 4, "alpha": 8, "targets": ["q_proj"], "expert_targets": ["gate_up_proj", "down_proj"]}
    build = _build(tmp_path, "mixtral-experts", model=_pretrained(folder), adapter=adapter, train={"learning_rate": 1e-2})
    assert _fell(_losses(build))
    # by hand, per layer: q 4 x 32 + 32 x 4; each of 4 experts, gate_up (32 in, 48 out) and down (24 in, 32 out)
    per_layer = (4 * 32 + 32 * 4) + 4 * 4 * ((32 + 48) + (24 + 32))
    plan = json.loads((build / "plan.json").read_text())["stages"][0]
    assert _report(build)[0]["params_trainable"] == plan["params"]["trainable"] == 2 * per_layer == 4864
