"""Packing: several sequences per row, positions restarting, attention confined to each sequence."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from runtime.contract.packing import pack, pack_stats
from runtime.contract.steps import total_steps, training_items
from runtime.core.data import IGNORE_INDEX, TrainRow, collate_rows
from runtime.core.losses import TokenLoss
from runtime.core.packing import collate_packed, pack_rows
from runtime.core.segments import SEGMENTED, runs_per_sequence, segments_of, use_per_sequence
from tests.conftest import base_recipe, run_cli, write_json_recipe


def test_packs_hold_every_sequence_once_within_the_budget() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(500)]
    packs = pack(lengths, 64)
    assert sorted(i for p in packs for i in p) == list(range(500))
    assert all(sum(lengths[i] for i in p) <= 64 for p in packs)
    assert pack(lengths, 64) == packs  # depends on nothing but the lengths and the budget
    # best fit is within one row of the bound total/budget for sequences this short
    assert len(packs) <= -(-sum(lengths) // 64) + 1


def test_pack_counts_of_known_cases() -> None:
    assert len(pack([33] * 10, 64)) == 10  # no two fit together
    assert len(pack([32] * 10, 64)) == 5  # exactly two a row
    assert sorted(map(sorted, pack([60, 4, 50, 14, 30, 30, 2], 64))) == [[0, 1], [1 + 1, 3], [4, 5, 6]]
    stats = pack_stats([32] * 10 + [16], 64)
    assert stats == {"packs": 6, "sequences": 11, "sequences_per_pack": round(11 / 6, 3),
                     "padding_share": round(1 - 336 / 384, 4)}
    # the step formula counts packs with packing, rows without
    assert training_items([32] * 10, 64, packing=True) == 5
    assert training_items([32] * 10, 64, packing=False) == 10
    assert total_steps(5, 2, 1, 1, epochs=3, max_steps=None) == 9


def _rows(seed: int = 0) -> list[TrainRow]:
    """Sequences with a prompt (not supervised) and a completion, ids inside a vocabulary of 64."""
    rng = random.Random(seed)
    out = []
    for line in range(7):
        prompt = [rng.randrange(1, 64) for _ in range(rng.randint(1, 6))]
        completion = [rng.randrange(1, 64) for _ in range(rng.randint(1, 8))]
        out.append(TrainRow(tuple(prompt + completion), (IGNORE_INDEX,) * len(prompt) + tuple(completion), line))
    return out


def _model(kind: str, attention: str, per_sequence: bool = False) -> torch.nn.Module:
    """A tiny float64 model; with `per_sequence` it runs runtime.core.segments' attention (the
    runtime's choice for packed stages), else transformers' block-diagonal mask over packed rows."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             attn_implementation=attention)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attention)
        model = GPT2LMHeadModel(config)
    if per_sequence:
        assert use_per_sequence(model) and model.config._attn_implementation == SEGMENTED[attention]
    return model.double().eval()  # float64: the comparison measures the packing, not rounding


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss_sum, count = TokenLoss(model)(**batch)
    (loss_sum / count).backward()
    return (loss_sum / count).detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("per_sequence", [False, True], ids=["mask", "per-sequence"])
@pytest.mark.parametrize("kind,attention", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"),
                                            ("gpt2", "eager")])
def test_packed_loss_and_gradients_equal_the_unpacked(kind: str, attention: str, per_sequence: bool) -> None:
    rows = _rows()
    model = _model(kind, attention, per_sequence)
    packs = pack_rows(rows, 24)
    assert len(packs) < len(rows) and any(len(p.members) > 1 for p in packs)
    unpacked_loss, unpacked = _loss_and_grads(model, collate_rows(rows, pad_id=0))
    packed_batch = collate_packed(packs, pad_id=0)
    # the packed rows supervise exactly the tokens the unpacked rows do
    assert int((packed_batch["labels"] != IGNORE_INDEX).sum()) == sum(
        sum(1 for t in r.labels[1:] if t != IGNORE_INDEX) for r in rows)
    packed_loss, packed = _loss_and_grads(model, packed_batch)
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=0)
    assert packed.keys() == unpacked.keys()
    for name in unpacked:  # relative to each gradient's norm (eager softmax rounds in float32)
        error = (packed[name] - unpacked[name]).norm() / unpacked[name].norm()
        assert error <= 1e-5, (name, float(error))


@pytest.mark.parametrize("kind,attention,per_sequence", [("llama", "sdpa", False), ("gpt2", "eager", False),
                                                         ("llama", "sdpa", True), ("gpt2", "eager", True)])
def test_one_sequences_loss_has_no_gradient_through_another_sequence_of_its_row(
        kind: str, attention: str, per_sequence: bool) -> None:
    rows = _rows(1)
    model = _model(kind, attention, per_sequence).float()
    packs = pack_rows(rows, 32)
    row = max(packs, key=lambda p: len(p.members))
    assert len(row.members) >= 3
    batch = collate_packed([row], pad_id=0)
    starts = [0]
    for m in row.members:
        starts.append(starts[-1] + len(m))
    embeddings = model.get_input_embeddings()
    kept: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        kept["out"] = output

    handle = embeddings.register_forward_hook(keep)
    try:
        for k in range(len(row.members)):  # the loss of sequence k alone
            labels = torch.full_like(batch["labels"], IGNORE_INDEX)
            labels[:, starts[k] : starts[k + 1]] = batch["labels"][:, starts[k] : starts[k + 1]]
            loss_sum, count = TokenLoss(model)(**{**batch, "labels": labels})
            model.zero_grad()
            loss_sum.backward()
            grad = kept["out"].grad[0]  # [width, hidden]
            inside = grad[starts[k] : starts[k + 1]]
            outside = torch.cat([grad[: starts[k]], grad[starts[k + 1] :]])
            assert inside.abs().sum() > 0
            assert torch.equal(outside, torch.zeros_like(outside)), f"sequence {k} sees another sequence"
    finally:
        handle.remove()


def _compile(tmp_path: Path, name: str, max_total: int = 160, **train) -> Path:
    """The tiny recipe (7 training rows of about 20 tokens) with rows of `max_total` tokens."""
    recipe = base_recipe(name=name, model={"n_embd": 32, "n_layer": 2, "n_head": 2},
                         tokens={"max_total": max_total, "coverage": 1.0, "truncatable": ["text"]},
                         train={"micro_batch_size": 4, "log_every_steps": 1, **train})
    path = write_json_recipe(tmp_path, recipe, name=f"{name}.json")
    build = tmp_path / name
    compiled = run_cli("compile", str(path), "--out", str(build), cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    return build


def test_the_plan_counts_packed_steps_by_the_contract_formula(tmp_path: Path) -> None:
    packed = _compile(tmp_path, "packed", packing=True, micro_batch_size=1)
    unpacked = _compile(tmp_path, "rows", micro_batch_size=1)
    plan = json.loads((packed / "plan.json").read_text())
    config = json.loads((packed / "runtime.json").read_text())
    stage, spec = plan["stages"][0], config["stages"][0]
    data = config["data"][spec["data"]]
    lengths = []
    for line in (packed / data["train"]).read_text().splitlines():
        record = json.loads(line)
        lengths.append(len(record["prompt"]) + len(record["completion"]))
    budget = max(data["max_total_tokens"], *lengths)
    packs = pack(lengths, budget)
    expected = spec["epochs"] * -(-len(packs) // spec["grad_accum"])  # one pack a micro-batch
    assert stage["steps"] == expected
    assert stage["steps"] < json.loads((unpacked / "plan.json").read_text())["stages"][0]["steps"]
    assert stage["packing"]["packs"] == len(packs) and stage["packing"]["sequences"] == len(lengths)
    assert stage["packing"]["padding_share"] == round(1 - sum(lengths) / (budget * len(packs)), 4)


def _train(build: Path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    return subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.slow
def test_a_packed_stage_trains_reports_its_packs_and_resumes_bit_exact(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from runtime.core.checkpoint import complete_checkpoints
    from runtime.contract.layout import CHECKPOINT_DIR
    from runtime.report import build_run_report

    build = _compile(tmp_path, "packed", max_total=48, packing=True, micro_batch_size=1, epochs=4,
                     save_every_steps=4, keep_checkpoints=3)
    first = _train(build)
    assert first.returncode == 0, first.stderr
    plan = json.loads((build / "plan.json").read_text())["stages"][0]
    report = build_run_report(build)["stages"][0]
    assert report["packing"]["packs"] == plan["packing"]["packs"]
    assert report["packing"]["sequences"] == plan["packing"]["sequences"] == report["train_examples"]["actual"]
    assert report["packing"]["sequences_per_pack"] > 1.5 and plan["steps"] == 4 * report["packing"]["packs"]
    assert report["packing"]["attention"] == "per sequence"  # the build's sdpa, one call per sequence
    assert report["steps"]["planned"] == report["steps"]["actual"] == plan["steps"]
    metrics = [json.loads(line) for line in (build / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    expected = load_file(build / "model" / "model.safetensors")

    # Make the stage unfinished and its newest checkpoint unusable: it resumes from an earlier one.
    found = complete_checkpoints(build / CHECKPOINT_DIR)
    assert len(found) >= 2
    for folder in found[1:]:
        (folder / "state.json").unlink()
    (build / "stages" / "sft" / "done.json").unlink()
    second = _train(build)
    assert second.returncode == 0, second.stderr
    assert f'resuming stage "sft" at step 4/{plan["steps"]}' in second.stderr
    got = load_file(build / "model" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
