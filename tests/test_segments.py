"""Attention per packed sequence (runtime.core.segments): each sequence of a pack is its own
attention call, and the losses and gradients are those of the unpacked rows, windows and
soft-capping included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runtime.core.data import collate_rows
from runtime.core.losses import TokenLoss
from runtime.core.packing import collate_packed, pack_rows
from runtime.core.segments import SEGMENTED, runs_per_sequence, segments_of, use_per_sequence
from tests.test_packing import _loss_and_grads, _model, _rows


def test_segments_start_where_positions_restart() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3],
                              [0, 1, 0, 1, 2, 3, 4, 0, 1]])
    assert segments_of(positions) == ((0, 0, 3), (0, 3, 5), (0, 5, 9), (1, 0, 2), (1, 2, 7), (1, 7, 9))
    # a row that is one sequence
    assert segments_of(torch.arange(5)[None]) == ((0, 0, 5),)


def _sdpa_calls(monkeypatch: pytest.MonkeyPatch, masks: list[bool] | None = None) -> list[int]:
    """The keys of every SDPA call (the queries of a one-token call have its head groups folded
    in), and in `masks` whether the call had a mask."""
    seen: list[int] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        seen.append(key.shape[2])
        if masks is not None:
            masks.append(kwargs.get("attn_mask") is not None)
        return original(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def test_each_attention_call_sees_one_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows()
    packs = pack_rows(rows, 24)
    batch = collate_packed(packs, pad_id=0)
    width = batch["input_ids"].shape[1]
    # every sequence of every row, and each row's padding after its last sequence
    expected = []
    for p in packs:
        lengths = [len(m) for m in p.members]
        expected += lengths + ([width - sum(lengths)] if sum(lengths) < width else [])
    assert max(expected) < width
    layers = 2

    masks: list[bool] = []
    seen = _sdpa_calls(monkeypatch, masks)
    TokenLoss(_model("llama", "sdpa", per_sequence=True))(**batch)
    assert seen == expected * layers
    assert not any(masks)  # every block is plain causal: SDPA's causal kernel, no mask

    seen.clear()  # transformers' own path: one call over the whole rows in each layer
    TokenLoss(_model("llama", "sdpa"))(**batch)
    assert seen == [width] * layers


def _sliding(kind: str) -> torch.nn.Module:
    """Tiny models whose sequences are longer than their window: Mistral (every layer windowed,
    sdpa) and Gemma-2 (every other layer windowed, eager with soft-capped scores and logits)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    if kind == "mistral":
        config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                               sliding_window=4, attn_implementation="sdpa")
        model = MistralForCausalLM(config)
    else:
        config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                              sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                              attn_implementation="eager")
        model = Gemma2ForCausalLM(config)
    return model.double().eval()


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_windows_and_soft_capping_stay_as_the_model_defines_them(kind: str) -> None:
    rows = _rows()
    assert max(len(r) for r in rows) > 4  # sequences reach beyond the window
    model = _sliding(kind)
    unpacked_loss, unpacked = _loss_and_grads(model, collate_rows(rows, pad_id=0))
    assert use_per_sequence(model)
    packed_loss, packed = _loss_and_grads(model, collate_packed(pack_rows(rows, 24), pad_id=0))
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=0)
    for name in unpacked:
        error = (packed[name] - unpacked[name]).norm() / unpacked[name].norm()
        assert error <= 1e-5, (name, float(error))


def test_sdpa_gets_a_mask_only_where_a_window_cuts_into_a_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows()
    packs = pack_rows(rows, 24)
    model = _sliding("mistral")  # window of 4 in both layers
    assert use_per_sequence(model)
    masks: list[bool] = []
    seen = _sdpa_calls(monkeypatch, masks)
    TokenLoss(model)(**collate_packed(packs, pad_id=0))
    assert seen and masks == [n > 4 for n in seen]
    assert any(masks) and not all(masks)


def test_gradient_checkpointing_recomputes_each_sequence_alone() -> None:
    rows = _rows(2)
    batch = collate_packed(pack_rows(rows, 24), pad_id=0)
    plain = _model("llama", "sdpa", per_sequence=True).train()  # dropout is 0: train() only enables checkpointing
    expected_loss, expected = _loss_and_grads(plain, batch)
    checkpointed = _model("llama", "sdpa", per_sequence=True).train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, got = _loss_and_grads(checkpointed, batch)
    assert checkpointed.model.gradient_checkpointing and checkpointed.model.layers[0].gradient_checkpointing
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_unpacked_calls_run_the_plain_implementation(attention: str) -> None:
    """Padded rows (held-out loss, generation) through the switched model: the very same logits."""
    ids = torch.tensor([[5, 6, 7, 0, 0], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    real = mask.bool()
    model = _model("llama", attention)
    expected = model(input_ids=ids, attention_mask=mask).logits[real]
    assert use_per_sequence(model) and runs_per_sequence(model)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits[real], expected)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.config._attn_implementation = attention
    assert torch.equal(generated, model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                                 pad_token_id=0))


def test_the_saved_model_does_not_carry_the_implementation(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = _model("llama", "sdpa", per_sequence=True)
    model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert SEGMENTED["sdpa"] not in text and "_attn_implementation" not in json.loads(text)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_flash_attention_keeps_its_own_kernels() -> None:
    model = _model("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    assert not use_per_sequence(model) and model.config._attn_implementation == "flash_attention_2"
    model.config._attn_implementation = "sdpa"
    assert use_per_sequence(model) and use_per_sequence(model)  # switching twice is switching once
    assert model.config._attn_implementation == SEGMENTED["sdpa"]


def test_a_packed_stage_says_how_its_sequences_attend() -> None:
    from types import SimpleNamespace

    from runtime.stages.language_model import packed_attention

    assert packed_attention(SimpleNamespace(compile=False), _model("gpt2", "eager")) == "per sequence"
    # compiled blocks would recompile for every new set of boundaries: transformers' mask instead
    compiled = _model("llama", "sdpa")
    assert packed_attention(SimpleNamespace(compile=True), compiled) == "block-diagonal mask"
    assert compiled.config._attn_implementation == "sdpa"
    flash = _model("llama", "sdpa")
    flash.config._attn_implementation = "flash_attention_2"
    assert packed_attention(SimpleNamespace(compile=False), flash) == "variable-length (flash)"
