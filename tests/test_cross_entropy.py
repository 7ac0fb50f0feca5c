"""train.cross_entropy: the chunked loss equals the full one, and never computes more than one
chunk of vocabulary logits at a time."""

from __future__ import annotations

import random

import pytest
import torch

from runtime.core.data import IGNORE_INDEX, PairRow, TrainRow, collate_pairs, collate_rows
from runtime.core.losses import TokenLoss
from runtime.core.packing import collate_packed, pack_rows
from runtime.stages.dpo import DpoLoss

CHUNK = 5  # small enough that every batch below spans several chunks


def _llama(vocab: int = 64, tied: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def _rows(seed: int = 0, n: int = 7) -> list[TrainRow]:
    """Sequences of different lengths (so the batch is padded), the prompt unsupervised."""
    rng = random.Random(seed)
    out = []
    for line in range(n):
        prompt = [rng.randrange(1, 64) for _ in range(rng.randint(1, 6))]
        completion = [rng.randrange(1, 64) for _ in range(rng.randint(2, 9))]
        out.append(TrainRow(tuple(prompt + completion), (IGNORE_INDEX,) * len(prompt) + tuple(completion), line))
    return out


def _loss_and_grads(loss: torch.nn.Module, model: torch.nn.Module, batch: dict, mode: str):
    loss.cross_entropy, loss.chunk_positions = mode, CHUNK
    model.zero_grad()
    out = loss(**batch)
    value = out[0] / out[1]
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(full, chunked) -> None:
    (full_loss, full_grads), (chunked_loss, chunked_grads) = full, chunked
    torch.testing.assert_close(chunked_loss, full_loss, rtol=1e-5, atol=0)
    assert chunked_grads.keys() == full_grads.keys() and full_grads
    for name in full_grads:
        error = (chunked_grads[name] - full_grads[name]).norm() / full_grads[name].norm()
        assert error <= 1e-5, (name, float(error))


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_sft_loss_and_gradients_equal_the_full_ones_on_a_padded_batch(tied: bool) -> None:
    model = _llama(tied=tied)
    batch = collate_rows(_rows(), pad_id=0)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) > 3 * CHUNK
    assert not bool(batch["attention_mask"].all())  # padded
    loss = TokenLoss(model)
    _assert_same(_loss_and_grads(loss, model, batch, "full"), _loss_and_grads(loss, model, batch, "chunked"))


def test_chunked_loss_equals_the_full_one_on_packed_rows() -> None:
    model = _llama()
    batch = collate_packed(pack_rows(_rows(1), 24), pad_id=0)
    assert "position_ids" in batch
    loss = TokenLoss(model)
    _assert_same(_loss_and_grads(loss, model, batch, "full"), _loss_and_grads(loss, model, batch, "chunked"))


def test_chunked_dpo_loss_and_gradients_equal_the_full_ones() -> None:
    policy, reference = _llama(), _llama()
    with torch.no_grad():  # a reference that differs from the policy, so the log-ratios are not zero
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    rng = random.Random(2)

    def completion(prompt: list[int]) -> TrainRow:
        tokens = [rng.randrange(1, 64) for _ in range(rng.randint(3, 8))]
        return TrainRow(tuple(prompt + tokens), (IGNORE_INDEX,) * len(prompt) + tuple(tokens), 0)

    prompts = [[rng.randrange(1, 64) for _ in range(4)] for _ in range(4)]
    pairs = [PairRow(chosen=completion(p), rejected=completion(p), line=i) for i, p in enumerate(prompts)]
    batch = collate_pairs(pairs, pad_id=0)
    loss = DpoLoss(policy, {"beta": 0.5, "loss_type": "sigmoid", "label_smoothing": 0.0}, reference)
    loss._reference[0].chunk_positions = CHUNK
    _assert_same(_loss_and_grads(loss, policy, batch, "full"), _loss_and_grads(loss, policy, batch, "chunked"))


def test_chunked_loss_applies_the_head_to_one_chunk_at_a_time() -> None:
    model = _llama()
    batch = collate_rows(_rows(), pad_id=0)
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    rows_seen: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda _m, inputs, _o: rows_seen.append(inputs[0].shape[0]))
    try:
        _loss_and_grads(TokenLoss(model), model, batch, "chunked")
    finally:
        handle.remove()
    chunks = -(-supervised // CHUNK)
    assert max(rows_seen) == CHUNK
    # every chunk once forward, and once more when backward recomputes its logits
    assert len(rows_seen) == 2 * chunks and sum(rows_seen) == 2 * supervised


def test_ranks_that_agree_on_more_chunks_score_empty_ones_with_the_same_result() -> None:
    """Under ZeRO-3 every head call gathers the sharded head, so every rank must make as many:
    a rank with fewer chunks than the agreed count pads with empty ones."""
    model = _llama()
    batch = collate_rows(_rows(), pad_id=0)
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = TokenLoss(model)
    alone = _loss_and_grads(loss, model, batch, "chunked")
    calls: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
    loss.agree_chunks = lambda chunks: chunks + 2
    try:
        agreed = _loss_and_grads(loss, model, batch, "chunked")
    finally:
        handle.remove()
    _assert_same(alone, agreed)
    chunks = -(-supervised // CHUNK) + 2
    assert len(calls) == 2 * chunks and calls.count(0) == 4  # two empty chunks, forward and recomputed


def test_final_logit_softcapping_matches_transformers_loss() -> None:
    """Gemma-2 caps its logits as cap * tanh(logits / cap); transformers' own loss is the reference."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          final_logit_softcapping=0.5, attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # logits well beyond the cap, so capping them matters
        model.lm_head.weight.mul_(30)
    rows = [r for r in _rows(3) if len(r) == max(len(x) for x in _rows(3))][:1]  # one row: no padding
    batch = collate_rows(rows, pad_id=0)
    expected = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    for mode in ("full", "chunked"):
        loss = TokenLoss(model, cross_entropy=mode)
        loss.chunk_positions = 2
        total, count = loss(**batch)
        torch.testing.assert_close(total / count, expected, rtol=1e-5, atol=0)
    uncapped = TokenLoss(model)
    uncapped.softcap = None
    with torch.no_grad():
        assert abs(float(uncapped(**batch)[0] / count) - float(expected)) > 0.1  # the cap changes the loss


@pytest.mark.parametrize(("kind", "device", "installed", "reason"), [
    ("sft", "cpu", True, 'which needs hardware.device = "cuda"'),
    ("sft", "cuda", False, "pip install 'recipe[liger]'"),
    ("dpo", "cuda", True, "dpo needs each token's log-probability"),
    ("reward", "cuda", True, "has no vocabulary logits"),
    ("sft", "cuda", True, None),
])
def test_fused_cross_entropy_is_refused_by_name_where_it_cannot_run(monkeypatch, kind, device, installed,
                                                                    reason) -> None:
    import json

    from runtime.contract import config as contract
    from tests.conftest import REPO

    golden = json.loads((REPO / "tests" / "golden" / "tweet-sentiment" / "runtime.json").read_text())
    stage = {**golden["stages"][0], "kind": kind, "cross_entropy": "fused"}
    config = contract.RuntimeConfig.model_validate({**golden, "stages": [stage],
                                                    "hardware": {**golden["hardware"], "device": device}})
    real = contract.importlib.util.find_spec
    monkeypatch.setattr(contract.importlib.util, "find_spec",
                        lambda name: (real("json") if installed else None) if name == "liger_kernel" else real(name))
    refused = [line for line in contract.unsupported(config) if "cross_entropy" in line]
    if reason is None:
        assert refused == []
    else:
        assert len(refused) == 1 and reason in refused[0] and refused[0].startswith('stage "sft"')
