"""benchmarks/gpu_suite.py: device names find their hardware file, the time guard writes what it
has, and the smoke run (CPU, tiny configs) trains every case through the compiler and runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.contract.paths import specs_dir
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_suite  # noqa: E402


def _suite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"))


def test_device_names_map_to_their_hardware_files() -> None:
    assert gpu_suite.hardware_file_for("NVIDIA H200") == "h200-141gb"
    assert gpu_suite.hardware_file_for("NVIDIA H100 80GB HBM3") == "h100-sxm-80gb"
    assert gpu_suite.hardware_file_for("NVIDIA H100 PCIe") == "h100-pcie-80gb"
    assert gpu_suite.hardware_file_for("NVIDIA A100-SXM4-40GB") == "a100-sxm-40gb"
    assert gpu_suite.hardware_file_for("Some Future GPU") is None
    files = {path.stem for path in (specs_dir() / "hardware").glob("*.toml")}
    assert {file for _, file in gpu_suite.DEVICE_FILES} <= files


def test_every_case_names_a_catalog_model_and_two_micro_batch_sizes() -> None:
    models = {path.stem for path in (specs_dir() / "models").glob("*.toml")}
    for case in gpu_suite.CASES:
        assert case.catalog in models and len(set(case.micro_batches)) == 2, case.name


def test_the_time_guard_records_every_run_as_skipped_and_writes_both_files(tmp_path: Path) -> None:
    result = _suite("--out", str(tmp_path), "--smoke", "--budget-s", "0")
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "gpu_suite.json").read_text())["runs"]
    assert len(runs) == len(gpu_suite.CASES)  # one micro-batch size each in a smoke run
    assert all(run["error"].startswith("skipped: the 0 s time guard") for run in runs)
    assert "| smollm2-135m-full | 8 |" in (tmp_path / "gpu_suite.md").read_text()


@pytest.mark.slow
def test_the_smoke_run_trains_every_case_and_compares_it_with_its_plan(tmp_path: Path) -> None:
    result = _suite("--out", str(tmp_path), "--smoke")
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    runs = {run["case"]: run for run in json.loads((tmp_path / "gpu_suite.json").read_text())["runs"]}
    assert [r["case"] for r in last["runs"]] == list(runs)
    assert runs["qwen2.5-0.5b-full-packed-fa2"]["error"] == "skipped: flash_attention_2 needs CUDA"
    trained = [run for name, run in runs.items() if not name.endswith("fa2")]
    for run in trained:
        assert run.get("error") is None, run
        assert run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1
        assert run["step_s"] > 0 and run["plan_step_s"] > 0
        assert run["peak_allocated_gib"] > 0 and run["plan_peak_gib"] > 0
        assert run["probe_peak_gib"] is not None
    loss_note = runs["llama-3.2-3b-lora-r16"]["note"]
    assert loss_note in ("chunked loss", "default loss (no cross_entropy key in the recipe schema yet)")
    assert not (tmp_path / "work").exists()  # checkpoints and builds are removed
