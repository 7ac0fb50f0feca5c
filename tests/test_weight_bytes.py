"""The plan's `weights` term is what the runtime allocates: the bytes of every parameter and buffer
of the model a stage trains, as the runtime holds it (frozen weights in the working precision or
quantized, trainable ones as fp32 master copies), for each adapter kind and quantization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compiler.emission.build import compile_recipe
from runtime.contract.config import RuntimeConfig
from runtime.core.model import apply_adapter
from runtime.core.outputs import starting_model
from tests.conftest import base_recipe, save_tiny_llama, write_json_recipe

ADAPTERS = {
    "full": {"kind": "full"},
    "lora": {"kind": "lora", "rank": 4, "targets": "all-linear"},
    "prefix": {"kind": "prefix", "num_virtual_tokens": 4},
    "freeze": {"kind": "freeze", "trainable_layers": 1},
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A small Llama with grouped-query attention and an untied output layer, saved in fp32."""
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", hidden=64, intermediate=128,
                           layers=2)


def _plan_and_model(tmp_path: Path, model: dict, adapter: dict, precision: str) -> tuple[int, torch.nn.Module]:
    recipe = base_recipe(adapter=adapter, hardware={"device": "cpu", "precision": precision})
    recipe["model"] = model
    del recipe["eval"]
    build = compile_recipe(write_json_recipe(tmp_path, recipe))
    config = RuntimeConfig.model_validate_json(build.files["runtime.json"])
    stage = config.stages[0]
    trained = apply_adapter(starting_model(config, tmp_path, stage), stage.adapter)
    return build.estimates[0].memory.weights_bytes, trained


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.element_size() * t.numel()


def _quant_state_bytes(param: torch.Tensor) -> int:
    """What bitsandbytes keeps beside a quantized weight: a 4-bit weight's QuantState (absmax, code,
    and the nested state of double quantization), an 8-bit weight's per-row scales."""
    state = getattr(param, "quant_state", None)
    if state is None:
        scales = getattr(param, "SCB", None)
        return _tensor_bytes(scales) if scales is not None else 0
    total = 0
    while state is not None:
        total += sum(_tensor_bytes(t) for t in (state.absmax, state.code) if t is not None)
        if state.nested:
            total += _tensor_bytes(state.offset)
        state = state.state2 if state.nested else None
    return total


def allocated_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied weights once), quantization state included."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += _tensor_bytes(t) + _quant_state_bytes(t)
    return total


def _pretrained(path: Path, quantization: str = "none") -> dict:
    return {"init": "pretrained", "path": str(path), "quantization": quantization}


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_planned_weights_are_the_loaded_bytes(tmp_path: Path, tiny_llama: Path, adapter: str, precision: str) -> None:
    planned, model = _plan_and_model(tmp_path, _pretrained(tiny_llama), ADAPTERS[adapter], precision)
    assert allocated_bytes(model) == planned


def test_half_precision_holds_frozen_weights_in_bf16_and_trainable_in_fp32(tmp_path: Path, tiny_llama: Path) -> None:
    _, lora = _plan_and_model(tmp_path, _pretrained(tiny_llama), ADAPTERS["lora"], "bf16")
    frozen = {p.dtype for p in lora.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in lora.parameters() if p.requires_grad}
    assert (frozen, trainable) == ({torch.bfloat16}, {torch.float32})
    _, freeze = _plan_and_model(tmp_path, _pretrained(tiny_llama), ADAPTERS["freeze"], "bf16")
    # the last of the two blocks trains: its 2 x 64 x 64 + 2 x 64 x 32 attention, 3 x 64 x 128 MLP and two norms
    assert sum(p.numel() for p in freeze.parameters() if p.dtype == torch.float32) == 8192 + 4096 + 24576 + 128
    _, full = _plan_and_model(tmp_path, _pretrained(tiny_llama), ADAPTERS["full"], "bf16")
    assert {p.dtype for p in full.parameters()} == {torch.float32}  # autocast over fp32 master weights


@pytest.mark.parametrize(("quantization", "adapter"),
                         [("none", "lora"), ("none", "freeze"), ("4bit", "lora"), ("4bit", "prefix"), ("8bit", "lora")])
def test_an_adapter_over_a_half_precision_base_trains_under_cpu_autocast(tmp_path: Path, tiny_llama: Path,
                                                                        quantization: str, adapter: str) -> None:
    _, model = _plan_and_model(tmp_path, _pretrained(tiny_llama, quantization), ADAPTERS[adapter], "bf16")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize(("quantization", "adapter"), [("4bit", "lora"), ("8bit", "lora"), ("4bit", "prefix")])
def test_planned_quantized_weights_are_the_loaded_bytes(tmp_path: Path, tiny_llama: Path, quantization: str,
                                                        adapter: str) -> None:
    planned, model = _plan_and_model(tmp_path, _pretrained(tiny_llama, quantization), ADAPTERS[adapter], "bf16")
    assert allocated_bytes(model) == planned


def test_a_4bit_base_is_nf4_double_quantized_by_hand(tmp_path: Path, tiny_llama: Path) -> None:
    """One 64 x 64 projection: 2,048 packed bytes, 64 uint8 absmax, one fp32 nested absmax, the
    256-value nested code, its offset and the 16-value NF4 code."""
    _, model = _plan_and_model(tmp_path, _pretrained(tiny_llama, "4bit"), ADAPTERS["lora"], "bf16")
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert (q.dtype, q.quant_state.quant_type, q.quant_state.nested) == (torch.uint8, "nf4", True)
    assert _tensor_bytes(q) + _quant_state_bytes(q) == 2048 + 64 + 4 + 1024 + 4 + 64
