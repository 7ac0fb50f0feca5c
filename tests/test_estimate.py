"""Parameter counts against transformers' own model, built on the meta device (no weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from compiler.estimate import Gpt2Shape, gpt2_parameters, gpt2_train_memory


@pytest.mark.parametrize(
    "shape",
    [
        Gpt2Shape(vocab_size=50257, n_positions=64, n_embd=128, n_layer=4, n_head=4),
        Gpt2Shape(vocab_size=50257, n_positions=111, n_embd=512, n_layer=6, n_head=8),
        Gpt2Shape(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),  # GPT-2 small
    ],
)
def test_gpt2_parameters_equal_transformers(shape: Gpt2Shape) -> None:
    config = GPT2Config(vocab_size=shape.vocab_size, n_positions=shape.n_positions, n_embd=shape.n_embd,
                        n_layer=shape.n_layer, n_head=shape.n_head)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    # unique parameters: the LM head shares the token embedding
    expected = sum(p.numel() for p in model.parameters())
    assert gpt2_parameters(shape).total == expected


def test_gpt2_small_is_124m() -> None:
    shape = Gpt2Shape(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    assert gpt2_parameters(shape).total == 124_439_808  # the published GPT-2 small size


def test_memory_breakdown_scales_as_documented() -> None:
    shape = Gpt2Shape(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    n = gpt2_parameters(shape).total
    fp32 = gpt2_train_memory(shape, micro_batch_size=4, seq_len=64, supervised_per_example=1,
                             precision="fp32", device="cpu")
    assert fp32.weights_bytes == 4 * n and fp32.gradients_bytes == 4 * n and fp32.optimizer_bytes == 8 * n
    assert fp32.overhead_bytes == 0
    doubled = gpt2_train_memory(shape, micro_batch_size=8, seq_len=64, supervised_per_example=1,
                                precision="fp32", device="cpu")
    assert doubled.activations_bytes == 2 * fp32.activations_bytes
    bf16 = gpt2_train_memory(shape, micro_batch_size=4, seq_len=64, supervised_per_example=1,
                             precision="bf16", device="cuda")
    assert bf16.weights_bytes == 6 * n  # bf16 working copy + fp32 master
    assert bf16.overhead_bytes > 0
