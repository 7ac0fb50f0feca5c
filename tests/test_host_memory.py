"""`hardware.host_memory`: what the training process does with the host memory tensors free.

`release` (the default) maps blocks of 1 MiB and more on their own, so a freed tensor leaves the
resident set at once; `reuse` keeps glibc's own policy, whose heap holds freed blocks for the next
allocation. Each policy runs in a fresh process: the C library's settings are per process and
cannot be undone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, base_recipe, run_cli, write_json_recipe

BLOCKS, BLOCK_MIB = 16, 8

# Sixteen 8 MiB tensors, each followed by a 1 MiB one that stays alive: freed, the large ones are
# holes in the middle of the heap, which glibc does not give back by itself (the top of the heap it
# trims on its own). Three allocations and frees of that size first: what glibc's own policy needs
# to raise its mmap threshold above 8 MiB and serve such blocks from the heap.
_SCRIPT = f"""
import json, sys
import torch
from runtime.core.host_memory import current_rss_gib, host_memory_policy, set_host_memory_policy

in_effect = set_host_memory_policy(sys.argv[1])
mib = lambda: current_rss_gib() * 1024
numel = {BLOCK_MIB} * 1024**2 // 4
for _ in range(3):
    warm = torch.ones(numel)
    del warm
before = mib()
large, small = [], []
for _ in range({BLOCKS}):
    large.append(torch.ones(numel))
    small.append(torch.ones(1024**2 // 4))
held = mib()
heap = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
low, high = (int(x, 16) for x in heap[0].split("-")) if heap else (0, 0)
in_heap = sum(low <= t.data_ptr() < high for t in large)
large.clear()
print(json.dumps({{"policy": in_effect, "recorded": host_memory_policy(), "in_heap": in_heap,
                  "held": held - before, "freed": mib() - before}}))
"""


def _resident_mib(policy: str) -> dict:
    result = subprocess.run([sys.executable, "-c", _SCRIPT, policy], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policies act on glibc's malloc")
def test_release_frees_at_once_and_reuse_keeps_freed_blocks_for_the_next_allocation() -> None:
    allocated = BLOCKS * BLOCK_MIB  # in the large tensors; the small ones stay alive throughout
    release = _resident_mib("release")
    assert release["policy"] == release["recorded"] == "release"
    assert release["in_heap"] == 0  # each mapped on its own
    assert release["held"] >= 0.9 * allocated
    assert release["freed"] <= release["held"] - 0.9 * allocated  # unmapped as each tensor was freed

    reuse = _resident_mib("reuse")
    assert reuse["policy"] == reuse["recorded"] == "reuse"
    assert reuse["in_heap"] == BLOCKS
    assert reuse["held"] >= 0.9 * allocated
    assert reuse["freed"] >= reuse["held"] - 0.1 * allocated  # kept in the heap for the next allocation


def _compile(tmp_path: Path, hardware: dict) -> tuple[subprocess.CompletedProcess, Path]:
    recipe = base_recipe(hardware=hardware)
    build = tmp_path / "build"
    result = run_cli("compile", str(write_json_recipe(tmp_path, recipe)), "--out", str(build), cwd=tmp_path)
    return result, build


def test_an_unknown_policy_is_refused_by_name(tmp_path: Path) -> None:
    result, build = _compile(tmp_path, {"host_memory": "fast"})
    assert result.returncode == 1
    assert 'hardware.host_memory = "fast" is not one of: release, reuse' in result.stderr, result.stderr
    assert "recipe.json:" in result.stderr  # where
    assert "Traceback" not in result.stderr
    assert not build.exists()


def test_the_default_releases_and_the_plan_says_nothing_more(tmp_path: Path) -> None:
    result, build = _compile(tmp_path, {})
    assert result.returncode == 0, result.stderr
    assert json.loads((build / "runtime.json").read_text())["hardware"]["host_memory"] == "release"
    assert json.loads((build / "plan.json").read_text())["hardware"]["host_memory"] == "release"
    assert "Host memory:" not in (build / "plan.md").read_text()


def test_reuse_reaches_the_runtime_and_every_report(tmp_path: Path) -> None:
    result, build = _compile(tmp_path, {"host_memory": "reuse"})
    assert result.returncode == 0, result.stderr
    assert json.loads((build / "runtime.json").read_text())["hardware"]["host_memory"] == "reuse"
    assert json.loads((build / "plan.json").read_text())["hardware"]["host_memory"] == "reuse"
    assert "resident set can run 30% or more above" in (build / "plan.md").read_text()

    trained = subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=tmp_path, capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert trained.returncode == 0, trained.stderr
    assert json.loads((build / "train_report.json").read_text())["host_memory"] == "reuse"
    assert json.loads((build / "run_report.json").read_text())["host_memory"] == "reuse"
    assert 'hardware.host_memory = "reuse"' in (build / "run_report.md").read_text()
