"""compile -> run -> eval through the CLI and the emitted torchrun launch, on tiny models."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import base_recipe, run_cli, write_json_recipe


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_compile_run_eval_on_real_tweets(tmp_path: Path) -> None:
    recipe = base_recipe(
        name="e2e",
        model={"n_embd": 32, "n_layer": 2, "n_head": 2, "dropout": 0.0},
        tokens={"max_total": "auto", "coverage": 0.98, "truncatable": ["text"]},
        train={"epochs": 2, "micro_batch_size": 64, "learning_rate": 3e-3, "warmup_steps": 5, "log_every_steps": 5},
        eval={"label_field": "label", "batch_size": 128},
    )
    recipe["data"]["tweets"].update(source={"asset": "vader-tweets"}, split={"heldout_fraction": 0.1, "seed": 3})
    path = write_json_recipe(tmp_path, recipe)
    build = tmp_path / "build"
    compiled = run_cli("compile", str(path), "--out", str(build), cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    ran = run_cli("run", str(build), cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "held-out accuracy" in ran.stdout

    # training really learned: the completion loss fell
    metrics = _read_jsonl(build / "metrics.jsonl")
    assert len(metrics) >= 4
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.2

    # the model was saved with its tokenizer and the exact template
    model_dir = build / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    template = json.loads((model_dir / "recipe_template.json").read_text())
    assert template["prompt"] == recipe["template"]["prompt"]
    config = json.loads((model_dir / "config.json").read_text())
    plan = json.loads((build / "plan.json").read_text())
    assert config["n_positions"] == plan["data"]["tweets"]["tokens"]["max_total_tokens"]

    # eval.json agrees with an independent computation from the raw predictions and the data
    report = json.loads((build / "eval.json").read_text())
    predictions = _read_jsonl(build / "predictions.jsonl")
    heldout = _read_jsonl(build / "data" / "tweets" / "heldout.jsonl")
    assert report["n"] == len(predictions) == len(heldout) == 420
    assert report["accuracy"] == round(sum(p["predicted"] == p["label"] for p in predictions) / 420, 4)
    train_labels = Counter(r["label"] for r in _read_jsonl(build / "data" / "tweets" / "train.jsonl"))
    majority = train_labels.most_common(1)[0][0]
    assert report["majority_baseline"] == round(sum(r["label"] == majority for r in heldout) / 420, 4)
    assert report["accuracy"] > 1 / 3  # better than guessing uniformly among three labels
    # the report puts the untrained weights' score beside the trained one, with the confusion plot
    assert 0 <= report["untrained_accuracy"] < report["accuracy"]
    assert (build / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (build / "eval.md").read_text()
    assert f"| trained model | {report['accuracy']:.1%} |" in markdown and "![confusion](confusion.png)" in markdown
    assert sum(sum(row.values()) for row in report["confusion"].values()) == 420


@pytest.mark.slow
def test_zero3_on_two_processes_matches_ddp(tmp_path: Path) -> None:
    """The same recipe under DistributedDataParallel and under DeepSpeed ZeRO-3 (parameters,
    gradients and optimizer state sharded over 2 processes): same steps, same losses."""
    losses = {}
    for zero in (0, 3):
        recipe = base_recipe(
            name=f"zero{zero}",
            hardware={"device": "cpu", "nproc_per_node": 2, "zero_stage": zero},
            train={"epochs": 4, "micro_batch_size": 2, "learning_rate": 1e-2, "log_every_steps": 1},
        )
        path = write_json_recipe(tmp_path, recipe, name=f"zero{zero}.json")
        build = tmp_path / f"zero{zero}"
        assert run_cli("compile", str(path), "--out", str(build), cwd=tmp_path).returncode == 0
        assert "--nproc_per_node=2" in (build / "launch.sh").read_text()
        assert json.loads((build / "ds_config.json").read_text())["zero_optimization"]["stage"] == zero
        ran = run_cli("run", str(build), cwd=tmp_path)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        metrics = _read_jsonl(build / "metrics.jsonl")
        # 7 training rows in batches of 2 -> 4 batches, 2 per rank: 2 steps per epoch, 4 epochs
        assert [m["step"] for m in metrics] == list(range(1, 9))
        assert json.loads((build / "plan.json").read_text())["stages"][0]["steps"] == 8
        assert metrics[-1]["loss"] < metrics[0]["loss"]
        assert json.loads((build / "eval.json").read_text())["n"] == 3
        assert (build / "model" / "model.safetensors").is_file()
        losses[zero] = [m["loss"] for m in metrics]
    assert losses[3] == pytest.approx(losses[0], rel=1e-4)


def test_run_refuses_a_directory_that_is_not_a_build(tmp_path: Path) -> None:
    result = run_cli("run", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert "not a build directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_refuses_a_build_edited_after_compile(tmp_path: Path) -> None:
    path = write_json_recipe(tmp_path, base_recipe())
    build = tmp_path / "build"
    assert run_cli("compile", str(path), "--out", str(build), cwd=tmp_path).returncode == 0
    runtime = build / "runtime.json"
    runtime.write_text(runtime.read_text().replace('"epochs": 1', '"epochs": 100'))
    result = run_cli("run", str(build), cwd=tmp_path)
    assert result.returncode == 1
    assert "runtime.json" in result.stderr and "changed after compile" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (build / "model").exists() and not (build / "metrics.jsonl").exists()


@pytest.mark.slow
def test_two_nodes_on_loopback_through_the_emitted_launch(tmp_path: Path) -> None:
    """2 "nodes" x 1 process: the emitted launch.sh on each, c10d rendezvous on 127.0.0.1, DeepSpeed
    ZeRO-2 (gradients and optimizer state sharded across the nodes)."""
    import os
    import socket
    import subprocess
    import sys

    recipe = base_recipe(name="two-nodes", hardware={"device": "cpu", "nodes": 2, "nproc_per_node": 1, "zero_stage": 2},
                         train={"epochs": 2, "micro_batch_size": 2, "learning_rate": 1e-2, "log_every_steps": 1})
    path = write_json_recipe(tmp_path, recipe)
    build = tmp_path / "build"
    assert run_cli("compile", str(path), "--out", str(build), cwd=tmp_path).returncode == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHON": sys.executable, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    nodes = [subprocess.Popen(["bash", str(build / "launch.sh")], env={**env, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    metrics = _read_jsonl(build / "metrics.jsonl")
    # 7 training rows in batches of 2 -> 4 batches, 2 per node: 2 steps per epoch, 2 epochs
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert (build / "model" / "config.json").is_file()
    assert json.loads((build / "eval.json").read_text())["n"] == 3


def test_training_refuses_a_build_planned_for_other_processes_before_it_starts(tmp_path: Path) -> None:
    """Compiled for 2 processes (7 rows, micro-batch 2: 4 batches, 2 steps per process), started
    as one: the plan's 2 steps are not the 4 this run would take, so nothing trains."""
    import os
    import subprocess
    import sys

    recipe = base_recipe(hardware={"device": "cpu", "nproc_per_node": 2},
                         train={"epochs": 1, "micro_batch_size": 2, "learning_rate": 1e-3})
    build = tmp_path / "build"
    compiled = run_cli("compile", str(write_json_recipe(tmp_path, recipe)), "--out", str(build), cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    assert json.loads((build / "plan.json").read_text())["stages"][0]["steps"] == 2
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert 'stage "sft": plan.json plans 2 steps, but 7 rows on 1 process(es) make 4' in errors[0]
    assert not (build / "metrics.jsonl").exists() and not (build / "checkpoints").exists()
    assert not (build / "model").exists()


@pytest.mark.slow
def test_three_processes_take_exactly_the_planned_steps(tmp_path: Path) -> None:
    """10 training rows, micro-batch 1, 3 processes: 10 micro-batches, 3 per process (the tenth is
    dropped so that every process takes as many steps), so 3 steps per epoch in the plan, and
    the run takes exactly the plan's steps."""
    source = tmp_path / "rows.tsv"
    lines = (Path(__file__).resolve().parent / "data" / "tiny.tsv").read_text().splitlines()
    extra = ["11\t1.2\tWhat a lovely morning", "12\t-1.8\tThe food was cold again", "13\t0.2\tThe shop opens at nine",
             "14\t2.2\tThis made my whole week"]
    source.write_text("\n".join(lines + extra) + "\n")
    recipe = base_recipe(name="three", hardware={"device": "cpu", "nproc_per_node": 3},
                         train={"epochs": 2, "micro_batch_size": 1, "learning_rate": 1e-3, "log_every_steps": 1})
    recipe["data"]["tweets"]["source"] = {"path": str(source)}
    build = tmp_path / "build"
    compiled = run_cli("compile", str(write_json_recipe(tmp_path, recipe)), "--out", str(build), cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    assert json.loads((build / "runtime.json").read_text())["data"]["tweets"]["n_train"] == 10
    assert "--nproc_per_node=3" in (build / "launch.sh").read_text()
    planned = json.loads((build / "plan.json").read_text())["stages"][0]["steps"]
    assert planned == 2 * 3
    ran = run_cli("run", str(build), cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    metrics = _read_jsonl(build / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, planned + 1))
    assert [m["epoch"] for m in metrics] == [0.333, 0.667, 1.0, 1.333, 1.667, 2.0]
    report = json.loads((build / "train_report.json").read_text())
    assert report["world_size"] == 3 and report["stages"][0]["steps"] == planned
    run_report = json.loads((build / "run_report.json").read_text())
    assert run_report["stages"][0]["steps"] == {"planned": planned, "actual": planned, "ratio": 1.0}
