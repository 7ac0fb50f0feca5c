"""Memory verdicts, time and cost, worked by hand from the formulas' definitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler.emission.build import compile_recipe
from compiler.estimation.catalog import ModelFacts
from compiler.estimation.estimate import (
    GIB,
    ActivationCoefficients,
    TrainSetup,
    optimizer_step_seconds,
    step_overhead_seconds,
    train_memory,
    wall_seconds,
)
from compiler.estimation.params import architecture
from tests.conftest import write_json_recipe

TINY = architecture(ModelFacts(name="t", family="llama", config={
    "model_type": "llama", "hidden_size": 10, "intermediate_size": 20, "num_attention_heads": 2,
    "num_key_value_heads": 1, "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 64}))
COEF = {"fp32": ActivationCoefficients(per_hidden=1, per_intermediate=0, per_kv=0)}


def _setup(**kw) -> TrainSetup:
    base = dict(total_parameters=1000, trainable_parameters=1000, micro_batch_size=2, seq_len=5,
                supervised_per_example=1, precision="fp32", device="cpu", coefficients=COEF)
    return TrainSetup(**{**base, **kw})


# TINY's rotary embedding: inv_freq and original_inv_freq, 3 fp32 values each (head_dim 5)
ROTARY = 2 * 3 * 4


def test_peak_is_the_larger_of_forward_end_and_backward_end() -> None:
    m = train_memory(TINY, _setup())
    # activations: 2 x 5 tokens x 2 layers x (1 byte x h=10) = 200 B; logits: 3 x 2 x 1 x 100 x 4 = 2400 B
    assert (m.activations_bytes, m.logits_bytes) == (200, 2400)
    # weights 4000 + optimizer 8000 + max(forward end 200 + 2400, backward end: gradients 4000)
    assert m.peak_bytes == 4000 + ROTARY + 8000 + max(2600, 4000) == 16024
    accumulating = train_memory(TINY, _setup(grad_accum=4))
    # gradients from earlier micro-batches are alive at the end of this forward pass
    assert accumulating.peak_bytes == 4000 + ROTARY + 8000 + (2600 + 4000)


def test_pure_bf16_keeps_no_fp32_copies() -> None:
    mixed = train_memory(TINY, _setup(precision="bf16", coefficients={}))
    pure = train_memory(TINY, _setup(precision="bf16", coefficients={}, master_weights=False))
    # mixed: fp32 master weights, whose bf16 copies (2000 B) autocast saves with the activations
    assert (mixed.weights_bytes, mixed.gradients_bytes, mixed.optimizer_bytes) == (4000 + ROTARY, 4000, 8000)
    assert mixed.activations_bytes - pure.activations_bytes >= 2000
    assert (pure.weights_bytes, pure.gradients_bytes, pure.optimizer_bytes) == (2000 + ROTARY, 2000, 4000)


def test_frozen_models_and_sharding() -> None:
    m = train_memory(TINY, _setup(frozen_model_parameters=(1000, 500)))
    assert m.frozen_models_bytes == (1000 + 500) * 4
    z3 = train_memory(TINY, _setup(world_size=4, zero_stage=3))
    assert (z3.weights_bytes, z3.gradients_bytes, z3.optimizer_bytes) == ((4000 + ROTARY) // 4, 1000, 2000)


def test_wall_time_at_an_mfu() -> None:
    # 6e15 FLOP on 2 devices of 100 TFLOP/s at 50% utilisation: 6e15 / (2 x 1e14 x 0.5) = 60 s
    assert wall_seconds(6 * 10**15, devices=2, peak_tflops=100.0, mfu=0.5) == pytest.approx(60.0)


def test_an_optimizer_step_moves_weights_gradients_and_state_at_the_memory_bandwidth() -> None:
    # AdamW, 1e9 parameters: read weight and gradient, write the weight (12 B), read and write two
    # fp32 moments (2 x 8 B): 28e9 bytes at 20 GB/s = 1.4 s
    assert optimizer_step_seconds(10**9, "adamw", bandwidth_gb_per_s=20) == pytest.approx(1.4)
    # SGD's one momentum buffer: 12 + 2 x 4 = 20 B per parameter
    assert optimizer_step_seconds(10**9, "sgd", bandwidth_gb_per_s=20) == pytest.approx(1.0)
    assert optimizer_step_seconds(10**9, "adamw", bandwidth_gb_per_s=0) == 0.0  # no figure: not counted


def test_per_step_overheads_add_a_fixed_cost_per_micro_batch_and_an_optimizer_step_per_step() -> None:
    # 100 steps of 4 micro-batches at 10 ms each, plus a 5 ms optimizer step: 100 x (0.04 + 0.005)
    assert step_overhead_seconds(steps=100, micro_batches_per_step=4, micro_batch_overhead_s=0.01,
                                 optimizer_step_s=0.005) == pytest.approx(4.5)


def test_the_process_overhead_is_the_hardware_files_figure_on_any_device() -> None:
    base = train_memory(TINY, _setup())
    held = train_memory(TINY, _setup(process_overhead_bytes=GIB // 2))
    assert base.overhead_bytes == 0 and held.overhead_bytes == GIB // 2
    assert held.peak_bytes == base.peak_bytes + GIB // 2
    assert train_memory(TINY, _setup(device="cuda")).overhead_bytes == 768 * 1024**2  # the CUDA default


def _pretrained(tmp_path: Path, adapter: dict, gpu: str, **hardware) -> dict:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"user_input": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(40)))
    recipe = {
        "name": "big", "model": {"init": "pretrained", "hub": "meta-llama/Llama-2-7b-hf", "catalog": "llama-2-7b"},
        "adapter": adapter,
        "data": {"d": {"source": {"path": str(data)}, "format": "completion"}},
        "template": {"prompt": "{{ user_input }}", "completion": " {{ completion }}"},
        "tokens": {"max_total": 1024},
        "train": {"micro_batch_size": 4, "learning_rate": 1e-5, "epochs": 1},
        "stages": [{"name": "sft", "kind": "sft"}],
        "hardware": {"device": "cuda", "gpu": gpu, "precision": "bf16", **hardware},
    }
    return compile_recipe(write_json_recipe(tmp_path, recipe)).plan


def test_a_7b_full_fine_tune_does_not_fit_a_24gb_gpu_and_the_plan_says_what_would(tmp_path: Path) -> None:
    plan = _pretrained(tmp_path, {"kind": "full"}, "rtx-4090-24gb")
    stage = plan["stages"][0]
    memory = stage["memory"]
    # 6,738,415,616 parameters: fp32 master weights 4 B each (autocast's bf16 copies are saved with
    # the activations), fp32 gradients 4 B, AdamW 8 B
    n = 6_738_415_616
    assert stage["params"] == {"total": n, "trainable": n, "trainable_fraction": 1.0}
    assert memory["breakdown_gib"]["weights"] == round(4 * n / GIB, 3)
    assert memory["breakdown_gib"]["optimizer"] == round(8 * n / GIB, 3)
    assert memory["fits"] is False and memory["device_gib"] == 23.6
    changes = [s["change"] for s in memory["suggestions"]]
    assert memory["suggestions"][0]["fits"]  # the best suggestion fits
    assert any(c.startswith('[adapter] kind = "lora"') for c in changes)
    assert plan["totals"]["fits"] is False and "does not fit" in plan["summary"]


def test_compute_time_and_cost_follow_the_catalog(tmp_path: Path) -> None:
    plan = _pretrained(tmp_path, {"kind": "lora", "rank": 8, "targets": ["q_proj", "v_proj"]}, "h100-sxm-80gb")
    compute = plan["stages"][0]["compute"]
    assert (compute["peak_tflops"], compute["mfu"]) == (989.4, 0.40)
    expected_s = compute["flops"] / (989.4e12 * 0.40)
    assert compute["wall_s"] == round(expected_s, 1)
    assert compute["gpu_hours"] == round(expected_s / 3600, 3)
    assert compute["cost_usd"] == round(expected_s / 3600 * 3.00, 2)
    assert plan["stages"][0]["memory"]["fits"] is True
    assert set(plan["totals"]) >= {"cost_usd", "gpu_hours"}
    overridden = _pretrained(tmp_path, {"kind": "lora"}, "h100-sxm-80gb", mfu=0.2, usd_per_hour=1.5)
    assert overridden["stages"][0]["compute"]["mfu"] == 0.2
    assert overridden["stages"][0]["compute"]["cost_usd"] == round(
        overridden["stages"][0]["compute"]["flops"] / (989.4e12 * 0.2) / 3600 * 1.5, 2)
