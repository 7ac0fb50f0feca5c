"""Watching a run: the held-out loss during training (`eval_every_steps`) and the experiment
trackers (`report_to`). Each tracker's output is read back with that library's own reader and must
hold the scalars of metrics.jsonl; the held-out loss is checked against a loss computed here with
transformers alone; and evaluating changes nothing about training."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.contract import config as contract
from tests.conftest import REPO, base_recipe, run_cli, write_json_recipe

STEPS, EVERY, LOG = 12, 5, 2
TRACKERS = ["tensorboard", "wandb", "mlflow"]


def _compile(tmp_path: Path, name: str, **train) -> Path:
    recipe = base_recipe(
        name=name, model={"n_embd": 32, "n_layer": 2, "n_head": 2, "dropout": 0.1},  # dropout: RNG in play
        train={"epochs": None, "max_steps": STEPS, "micro_batch_size": 2, "learning_rate": 1e-3,
               "log_every_steps": LOG, **train},
    )
    del recipe["train"]["epochs"]
    path = write_json_recipe(tmp_path, recipe, name=f"{name}.json")
    compiled = run_cli("compile", str(path), "--out", str(tmp_path / name), cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    return tmp_path / name


def _train(build: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=600)


def _rows(build: Path) -> list[dict]:
    return [json.loads(line) for line in (build / "metrics.jsonl").read_text().splitlines()]


def _scalars(build: Path) -> dict[tuple[int, str], float]:
    """(step, name) -> value for every number in metrics.jsonl."""
    return {(row["step"], key): float(value) for row in _rows(build) for key, value in row.items()
            if key not in ("format_version", "stage", "step")}


def _heldout_loss(build: Path) -> float:
    """Mean completion-token cross-entropy of the saved model on the held-out split, one row at a
    time with transformers only (no padding, no code of the runtime)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build / "model").eval()
    total, count = 0.0, 0
    for line in (build / "data" / "tweets" / "heldout.jsonl").read_text().splitlines():
        row = json.loads(line)
        ids = torch.tensor([row["prompt"] + row["completion"]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].double()
        targets = ids[0, 1:]
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        total += float(losses[len(row["prompt"]) - 1 :].sum())
        count += len(row["completion"])
    return total / count


def _heldout_accuracy(build: Path) -> float:
    """The saved model's accuracy on the held-out rows: greedy generation one row at a time with
    transformers only, the first word of the text against the label."""
    import re

    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(build / "model").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(build / "model")
    max_new_tokens = json.loads((build / "runtime.json").read_text())["eval"]["max_new_tokens"]
    rows = [json.loads(line) for line in (build / "data" / "tweets" / "heldout.jsonl").read_text().splitlines()]
    correct = 0
    for row in rows:
        ids = torch.tensor([row["prompt"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=50256, eos_token_id=50256)
        words = re.findall(r"[\w'-]+", tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        correct += bool(words) and words[0].lower() == row["label"].lower()
    return correct / len(rows)


def _wandb_history(run_dir: Path) -> tuple[list, dict]:
    """The history rows and config of an offline W&B run, from its transaction log: LevelDB-style
    32 KiB blocks of chunks (checksum, length, type) after a 7-byte ":W&B" header, each record a
    `wandb_internal_pb2.Record` (the library's own protobuf message)."""
    from wandb.proto import wandb_internal_pb2

    (log,) = run_dir.glob("run-*.wandb")
    data = log.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, history, config = 7, 32768, b"", [], {}
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
            elif record.WhichOneof("record_type") == "run":
                config = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                          for item in record.run.config.update}
    return history, config


@pytest.mark.slow
def test_eval_and_trackers_log_what_metrics_jsonl_holds(tmp_path: Path) -> None:
    build = _compile(tmp_path, "watched", eval_every_steps=EVERY, report_to=TRACKERS)
    plain = _compile(tmp_path, "plain")
    ran, plain_ran = _train(build), _train(plain)
    assert ran.returncode == 0, ran.stderr
    assert plain_ran.returncode == 0, plain_ran.stderr

    rows = _rows(build)
    evals = {row["step"]: row["eval_loss"] for row in rows if "eval_loss" in row}
    assert sorted(evals) == [5, 10, 12]  # every EVERY steps, and after the last
    assert all("loss" not in row for row in rows if "eval_loss" in row)
    assert f"step 5/{STEPS} held-out loss {evals[5]:.4f}" in ran.stderr
    # The last evaluation is of the saved model: the same number computed without the runtime.
    assert evals[STEPS] == pytest.approx(_heldout_loss(build), abs=2e-5)
    assert evals[STEPS] < evals[5]
    # The recipe's eval classifies: each evaluation also gives the accuracy by its rule, the last
    # one that of the saved model on the held-out rows (fewer than the sample cap of 64).
    accuracies = {row["step"]: row["eval_accuracy"] for row in rows if "eval_loss" in row}
    assert sorted(accuracies) == [5, 10, 12]
    assert accuracies[STEPS] == pytest.approx(_heldout_accuracy(build), abs=1e-4)
    assert f"step 5/{STEPS} held-out loss {evals[5]:.4f}, accuracy {accuracies[5]:.4f}" in ran.stderr

    # Evaluating disturbs nothing: the same weights and training losses as a run without it.
    from safetensors.torch import load_file

    expected, got = load_file(plain / "model" / "model.safetensors"), load_file(build / "model" / "model.safetensors")
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in _rows(plain)]

    # The run report names the best evaluation; loss.png draws both curves.
    report = json.loads((build / "run_report.json").read_text())["stages"][0]
    best = min(evals, key=lambda step: (evals[step], step))
    assert (report["evaluations"], report["best_eval_step"], report["best_eval_loss"]) == (3, best, evals[best])
    assert f"best {evals[best]:.4f} at step {best}" in (build / "run_report.md").read_text()

    want = _scalars(build)
    plan = json.loads((build / "plan.json").read_text())["stages"][0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(build / "runs" / "sft"))
    events.Reload()
    tensorboard = {(e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert tensorboard.keys() == want.keys()
    assert all(tensorboard[key] == pytest.approx(value, rel=1e-6) for key, value in want.items())

    (run_dir,) = (build / "wandb").glob("offline-run-*")
    history, config = _wandb_history(run_dir)
    wandb = {(row["_step"], key): value for row in history for key, value in row.items() if not key.startswith("_")}
    assert wandb == pytest.approx(want)
    assert config["plan/steps"] == plan["steps"] and config["plan/params_total"] == plan["params"]["total"]
    assert config["runtime"] == json.loads((build / "runtime.json").read_text())

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(build / "mlruns").absolute().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("watched").experiment_id])
    mlflow = {(m.step, key): m.value for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)}
    assert mlflow == pytest.approx(want)
    assert run.data.params["plan/steps"] == str(plan["steps"])
    assert run.data.params["plan/peak_memory_gib"] == str(plan["memory"]["peak_gib"])
    assert run.info.status == "FINISHED"


def test_a_missing_tracker_and_eval_during_ppo_are_refused_by_name(monkeypatch) -> None:
    golden = json.loads((REPO / "tests" / "golden" / "tweet-sentiment" / "runtime.json").read_text())
    stage = {**golden["stages"][0], "report_to": ["wandb", "tensorboard"]}
    config = contract.RuntimeConfig.model_validate({**golden, "stages": [stage]})
    real = contract.importlib.util.find_spec
    monkeypatch.setattr(contract.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    refused = contract.unsupported(config)
    assert refused == ['stage "sft" reports to wandb, which is not installed: pip install "recipe[wandb]" '
                       "(or remove it from train.report_to)"]
    for kind in ("ppo", "grpo"):
        online = {**golden["stages"][0], "kind": kind, "eval_every_steps": 10}
        config = contract.RuntimeConfig.model_validate({**golden, "stages": [online]})
        assert any(f'"sft" is {kind}, whose held-out measure is the reward of sampled completions' in line
                   and "eval_every_steps is for stages with a held-out loss" in line
                   for line in contract.unsupported(config))
    best = {**golden["stages"][0], "eval_every_steps": 10, "save_best": True}
    zero3 = {**golden["hardware"], "zero_stage": 3}
    config = contract.RuntimeConfig.model_validate({**golden, "stages": [best], "hardware": zero3})
    assert any("asks for save_best" in line and "ZeRO stage 3 shards them" in line
               for line in contract.unsupported(config))


@pytest.mark.slow
def test_save_best_and_early_stopping_keep_the_best_weights_and_stop_for_good(tmp_path: Path) -> None:
    # A high constant learning rate on six rows: the held-out loss falls, then rises as it overfits.
    every, patience, steps = 2, 3, 40
    build = _compile(tmp_path, "stopped", max_steps=steps, learning_rate=3e-2, lr_schedule="constant",
                     eval_every_steps=every, save_best=True, early_stopping_patience=patience,
                     save_every_steps=every, keep_checkpoints=steps)
    ran = _train(build)
    assert ran.returncode == 0, ran.stderr
    rows = _rows(build)
    evals = {row["step"]: row["eval_loss"] for row in rows if "eval_loss" in row}
    best = min(evals, key=lambda step: (evals[step], step))
    stop = best + patience * every  # the patience-th evaluation in a row without a lower loss
    assert sorted(evals) == list(range(every, stop + 1, every)) and stop < steps
    assert max(row["step"] for row in rows) == stop  # nothing trained after the stop

    report = json.loads((build / "run_report.json").read_text())["stages"][0]
    assert (report["kept_step"], report["stopped_at_step"], report["steps"]["actual"]) == (best, stop, stop)
    assert f"for {patience} evaluations" in report["stop_reason"] and f"(step {best})" in report["stop_reason"]
    md = (build / "run_report.md").read_text()
    assert f"Stopped early at step {stop}" in md and f"weights of step {best}" in md
    assert "an upper bound" in (build / "plan.md").read_text()

    # The output is the best step's weights: those of the checkpoint written at that step.
    from safetensors.torch import load_file

    (folder,) = (build / "checkpoints").glob(f"*-step{best:07d}")
    kept = torch.load(folder / "trainable.pt", weights_only=True)
    saved = load_file(build / "model" / "model.safetensors")
    assert kept.keys() >= saved.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    (last,) = (build / "checkpoints").glob(f"*-step{stop - every:07d}")
    assert not all(torch.equal(saved[k], torch.load(last / "trainable.pt", weights_only=True)[k]) for k in saved)

    # Running again trains nothing more: the stage is finished, early stop and all.
    metrics, weights = (build / "metrics.jsonl").read_bytes(), (build / "model" / "model.safetensors").read_bytes()
    again = _train(build)
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stderr
    assert (build / "metrics.jsonl").read_bytes() == metrics
    assert (build / "model" / "model.safetensors").read_bytes() == weights

    # Resumed from the checkpoint one evaluation after the best, the run goes on with the
    # evaluations that checkpoint carries: the same stop, and the weights kept at the best step.
    import shutil

    resume_from = best + every
    for folder in (build / "checkpoints").glob("*-step*"):
        if int(folder.name.rsplit("step", 1)[1]) > resume_from:
            shutil.rmtree(folder)
    (build / "stages" / "sft" / "done.json").unlink()
    shutil.rmtree(build / "model")
    resumed = _train(build)
    assert resumed.returncode == 0, resumed.stderr
    assert f'resuming stage "sft" at step {resume_from}' in resumed.stderr
    assert f"stopping early at step {stop}" in resumed.stderr
    again_saved = load_file(build / "model" / "model.safetensors")
    assert all(torch.equal(again_saved[k], saved[k]) for k in saved)


def test_save_best_and_early_stopping_need_eval_every_steps(tmp_path: Path) -> None:
    for key, value in (("save_best", True), ("early_stopping_patience", 2)):
        recipe = base_recipe(train={key: value})
        checked = run_cli("validate", str(write_json_recipe(tmp_path, recipe)), cwd=tmp_path)
        assert checked.returncode == 1
        assert f'stage "sft": {key} needs eval_every_steps' in checked.stderr
        assert f"set train.eval_every_steps = N (or remove {key})" in checked.stderr
        assert "Traceback" not in checked.stderr
        recipe["train"]["eval_every_steps"] = 5
        assert run_cli("validate", str(write_json_recipe(tmp_path, recipe)), cwd=tmp_path).returncode == 0
