"""`recipe hardware probe`: the file it writes has the catalog's schema and is read back as the
figures measured; the real command measures this machine (slow)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from compiler.cli.hardware import hardware_toml
from compiler.estimation.catalog import accelerator_from_file
from runtime.contract.paths import specs_dir
from tests.conftest import run_cli

FIGURES = {"device": "cpu", "threads": 2, "memory_gib": 0.0, "memory_bandwidth_gb_per_s": 21.5,
           "peak_tflops": {"fp32": 0.05, "bf16": 0.02}, "mfu": 0.31, "step_overhead_s": 0.004,
           "layer_overhead_s": 0.0015, "process_overhead_gib": 0.52}


def test_the_written_file_has_the_catalogs_keys_and_reads_back_as_measured(tmp_path: Path) -> None:
    path = tmp_path / "probed.toml"
    path.write_text(hardware_toml("probed", FIGURES, 0.1))
    written = tomllib.loads(path.read_text())
    catalog_cpu = tomllib.loads((specs_dir() / "hardware" / "cpu.toml").read_text())
    assert set(written) == set(catalog_cpu)
    acc = accelerator_from_file(path)
    assert (acc.name, acc.peak_tflops, acc.mfu) == ("probed", {"fp32": 0.05, "bf16": 0.02}, 0.31)
    assert (acc.memory_bandwidth_gb_per_s, acc.step_overhead_s, acc.layer_overhead_s) == (21.5, 0.004, 0.0015)
    assert acc.process_overhead_gib == 0.52


def test_every_gpu_file_without_a_process_figure_keeps_the_cuda_default() -> None:
    for path in sorted((specs_dir() / "hardware").glob("*.toml")):
        acc = accelerator_from_file(path)
        assert (acc.process_overhead_gib is None) == (path.stem != "cpu"), path.name


@pytest.mark.slow
def test_the_probe_measures_this_machine(tmp_path: Path) -> None:
    out = tmp_path / "here.toml"
    result = run_cli("hardware", "probe", "--device", "cpu", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr
    acc = accelerator_from_file(out)
    assert acc.peak_tflops["fp32"] > 0.001 and 0 < acc.mfu <= 1.0
    assert acc.memory_bandwidth_gb_per_s > 0.5
    # torch and transformers imported: well over 100 MiB, and far under the 8 GiB a leak would show
    assert 0.1 < acc.process_overhead_gib < 8
