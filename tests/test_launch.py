"""Launch artifacts: DeepSpeed config arithmetic, the Slurm job, rendezvous ports, and the checks
launch.sh makes before torchrun can hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from compiler.emission.build import compile_recipe
from compiler.emission.launch import PORT_BASE, PORT_SPAN, derived_port
from compiler.loading.overrides import parse_override
from tests.conftest import TINY_TSV, base_recipe, write_json_recipe


def _build(tmp_path: Path, *sets: str, **sections):
    recipe = base_recipe(**sections)
    # The tiny data six times over: one micro-batch for each of up to 8 processes (a stage that
    # would take no step is refused).
    rows = tmp_path / "tweets.tsv"
    rows.write_bytes(b"\r\n".join([TINY_TSV.read_bytes().rstrip(b"\r\n")] * 6) + b"\r\n")
    recipe["data"]["tweets"]["source"] = {"path": str(rows)}
    path = write_json_recipe(tmp_path, recipe)
    return compile_recipe(path, [parse_override(s) for s in sets])


def test_ds_config_batch_arithmetic_and_precision(tmp_path: Path) -> None:
    build = _build(tmp_path, "hardware.nproc_per_node=2", "hardware.nodes=2", "train.grad_accum=3",
                   "hardware.zero_stage=3", "hardware.offload_optimizer=true", "hardware.offload_params=true",
                   "hardware.device=cuda", "hardware.precision=bf16")
    ds = json.loads(build.files["ds_config.json"])
    assert ds["train_batch_size"] == 4 * 3 * 2 * 2  # micro-batch x accumulation x 2 nodes x 2 processes
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 3)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_one_ds_config_per_stage_when_there_are_several(tmp_path: Path) -> None:
    build = _build(tmp_path, stages=[{"name": "a", "kind": "sft"}, {"name": "b", "kind": "sft", "from": "a",
                                                                      "micro_batch_size": 2}])
    assert json.loads(build.files["ds_config.a.json"])["train_batch_size"] == 4
    assert json.loads(build.files["ds_config.b.json"])["train_batch_size"] == 2
    assert "ds_config.json" not in build.files


def test_derived_ports_are_stable_in_range_and_differ_between_recipes() -> None:
    ports = {derived_port(f"recipe-{i}") for i in range(50)}
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)
    assert len(ports) > 40
    assert derived_port("tweet-sentiment") == derived_port("tweet-sentiment")


def test_slurm_job_resources_and_no_secret_values(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_that_must_not_leak")
    build = _build(tmp_path, "hardware.device=cuda", "hardware.nodes=2", "hardware.nproc_per_node=4",
                   'launch.env=["HF_TOKEN"]', 'launch.slurm.partition="gpu"', 'launch.slurm.time="2-00:00:00"')
    job = build.files["job.slurm"].decode()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --time=2-00:00:00", "MASTER_PORT=$(( 29600 + SLURM_JOB_ID % 2000 ))"):
        assert line in job
    assert "--nproc_per_node=4" in job and '--rdzv_id="$SLURM_JOB_ID"' in job
    for name, content in build.files.items():
        assert b"hf_secret_value_that_must_not_leak" not in content, name
    assert ": \"${HF_TOKEN:?" in build.files["launch.sh"].decode()


def _run_launch(build_dir: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(build_dir / "launch.sh")], env=full_env, capture_output=True, text=True,
                          timeout=60)


def test_launch_refuses_a_busy_rendezvous_port_before_torchrun(tmp_path: Path) -> None:
    from compiler.emission.build import write_build

    build = _build(tmp_path, "hardware.nodes=2")
    write_build(build, tmp_path / "b")
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run_launch(tmp_path / "b", MASTER_ADDR="127.0.0.1", NODE_RANK="0", MASTER_PORT=str(port))
    assert result.returncode == 1
    assert f"rendezvous port {port} is already in use" in result.stderr


def test_launch_refuses_a_master_address_that_does_not_resolve(tmp_path: Path) -> None:
    from compiler.emission.build import write_build

    build = _build(tmp_path, "hardware.nodes=2")
    write_build(build, tmp_path / "b")
    result = _run_launch(tmp_path / "b", MASTER_ADDR="node-0.invalid", NODE_RANK="1")
    assert result.returncode == 1
    assert "MASTER_ADDR=node-0.invalid does not resolve" in result.stderr


def test_every_emitted_script_is_valid_bash(tmp_path: Path) -> None:
    for sets in ((), ("hardware.nodes=2",), ("hardware.nodes=3", 'launch.env=["HF_TOKEN", "WANDB_API_KEY"]',
                                              "launch.rdzv_port=31000", "hardware.device=cuda")):
        build = _build(tmp_path, *sets)
        for name in ("launch.sh", "job.slurm"):
            script = tmp_path / name
            script.write_bytes(build.files[name])
            result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
            assert result.returncode == 0, (sets, name, result.stderr)
    assert "MASTER_PORT=31000" in build.files["job.slurm"].decode()


def test_manifest_records_package_versions(tmp_path: Path) -> None:
    from importlib import metadata

    manifest = json.loads(_build(tmp_path).files["manifest.json"])
    assert manifest["versions"]["torch"] == metadata.version("torch")
    assert manifest["versions"]["transformers"] == metadata.version("transformers")
    assert set(manifest["versions"]) >= {"torch", "transformers", "peft", "deepspeed", "datasets"}
