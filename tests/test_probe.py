"""The longest batch first (runtime.core.probe): the right micro-batch is probed, the probe leaves
training bit-identical, its peak reaches the reports, and a batch that does not fit fails before
the first step with one line naming the plan's figures and the fixes."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.core.probe import ProbeOutOfMemory, longest_micro_batch, probe_peak_gib
from tests.conftest import base_recipe, run_cli, write_json_recipe


def test_the_probe_takes_the_micro_batch_with_the_most_token_slots() -> None:
    rows = [[0] * n for n in (5, 9, 3, 3, 3, 4, 8, 8)]
    # slots after padding: [0, 1] 2 x 9 = 18; [2, 3, 4] 3 x 3 = 9; [5, 6, 7] 3 x 8 = 24
    groups = [[[0, 1], [2, 3, 4]], [[5, 6, 7]]]
    assert longest_micro_batch(rows, groups) == [5, 6, 7]


def test_among_equal_slots_the_fullest_pack_is_probed() -> None:
    rows = [[0] * n for n in (10, 6, 9)]
    # one row per micro-batch: slots equal the row's length, so the longest (10) wins
    assert longest_micro_batch(rows, [[[1], [2]], [[0]]]) == [0]
    # two micro-batches of equal slots (2 x 10 = 20 and 2 x 10 = 20): the one with more real tokens
    rows = [[0] * n for n in (10, 2, 10, 9)]
    assert longest_micro_batch(rows, [[[0, 1]], [[2, 3]]]) == [2, 3]


class _Loss(torch.nn.Module):
    """A dropout model's summed squared output, in the (loss sum, count) shape of the loop's losses."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x).pow(2).sum(), torch.tensor(x.shape[0])


def _dropout_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))


def _cpu_config():
    """The two fields of a runtime config that autocast reads."""
    return type("Config", (), {"hardware": type("Hardware", (), {"precision": "fp32", "device": "cpu"})()})()


def test_the_probe_leaves_no_gradient_and_every_random_generator_as_it_was() -> None:
    model = _dropout_model()
    batch = {"x": torch.randn(32, 8)}
    random.seed(3), np.random.seed(3)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    peak = probe_peak_gib(_cpu_config(), torch.device("cpu"), model, _Loss(model), batch)
    assert torch.equal(torch.get_rng_state(), states[0])  # dropout drew masks, and the state came back
    assert random.getstate() == states[1]
    numpy_state = np.random.get_state()
    assert np.array_equal(numpy_state[1], states[2][1]) and numpy_state[2:] == states[2][2:]
    assert all(p.grad is None for p in model.parameters())
    assert peak > 0.05  # a Python process with torch loaded holds well over 50 MiB


def test_a_batch_that_does_not_fit_raises_with_the_measured_reason() -> None:
    model = _dropout_model()

    class Exhausting(_Loss):
        def forward(self, x):
            raise MemoryError("cannot allocate 64 GiB")

    with pytest.raises(ProbeOutOfMemory, match="cannot allocate 64 GiB"):
        probe_peak_gib(_cpu_config(), torch.device("cpu"), model, Exhausting(model), {"x": torch.randn(2, 8)})
    assert all(p.grad is None for p in model.parameters())


def _compile(tmp_path: Path) -> Path:
    recipe = base_recipe(model={"dropout": 0.2}, train={"epochs": 1, "micro_batch_size": 2, "log_every_steps": 1})
    path = write_json_recipe(tmp_path, recipe)
    build = tmp_path / "build"
    compiled = run_cli("compile", str(path), "--out", str(build), cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    return build


def _train_in_process(build: Path) -> int:
    from runtime import train

    return train.main([str(build)])


def test_weights_after_training_are_equal_with_and_without_the_probe(tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import load_file

    import runtime.core.loop as loop

    probed = _compile(tmp_path)
    plain = tmp_path / "plain"
    shutil.copytree(probed, plain)
    assert _train_in_process(probed) == 0
    with monkeypatch.context() as patch:
        patch.setattr(loop, "probe_longest_batch", lambda *args: None)
        assert _train_in_process(plain) == 0
    with_probe = load_file(probed / "model" / "model.safetensors")
    without = load_file(plain / "model" / "model.safetensors")
    assert with_probe.keys() == without.keys()
    for name in with_probe:
        assert torch.equal(with_probe[name], without[name]), name
    stage = json.loads((probed / "train_report.json").read_text())["stages"][0]
    assert stage["probe_peak_gib"] > 0.05
    assert json.loads((plain / "train_report.json").read_text())["stages"][0]["probe_peak_gib"] is None
    report = json.loads((probed / "run_report.json").read_text())["stages"][0]
    assert report["probe_peak_gib"]["actual"] == stage["probe_peak_gib"]
    assert report["probe_peak_gib"]["planned"] == report["peak_memory_gib"]["planned"]


def test_a_run_whose_longest_batch_does_not_fit_stops_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from runtime.core import losses

    build = _compile(tmp_path)

    def exhausted(self, **batch):
        raise MemoryError("cannot allocate memory")

    monkeypatch.setattr(losses.TokenLoss, "forward", exhausted)
    assert _train_in_process(build) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    planned = json.loads((build / "plan.json").read_text())["stages"][0]["memory"]["peak_gib"]
    assert "longest micro-batch (2 rows" in lines[0] and f"the plan's peak is {planned:.2f} GiB" in lines[0]
    assert "micro_batch_size" in lines[0] and "gradient_checkpointing" in lines[0]
    assert not (build / "model").exists()
