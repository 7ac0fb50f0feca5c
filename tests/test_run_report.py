"""The run report: the plan's predictions beside a run's measurements, from a synthetic build
directory (a trimmed real plan.json, hand-written metrics and train report; nothing is trained)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.contract.metrics import read_metrics
from runtime.loss_plot import plot_loss
from runtime.report import RunReportError, build_run_report, main, write_run_report

REPO = Path(__file__).resolve().parent.parent
PLAN = Path(__file__).resolve().parent / "data" / "run_report" / "plan.json"

# Two stages as train.py logs them: `sft` every step for 12 steps; `polish` resumed from its
# checkpoint at step 4, so steps 5 and 6 are logged twice and the later records must win.
SFT_LOSSES = [10.8, 10.1, 9.4, 8.2, 7.5, 6.1, 5.9, 4.4, 3.8, 3.0, 2.9, 2.5]
POLISH_FIRST_TRY = [(2, 2.4), (4, 2.3), (5, 9.0), (6, 9.5)]
POLISH_RESUMED = [(5, 2.2), (6, 2.1), (8, 2.0), (10, 1.9)]

TRAIN_REPORT = {
    "device": "cpu",
    "precision": "fp32",
    "world_size": 1,
    "stages": [
        {"stage": "sft", "kind": "sft", "adapter": "full", "steps": 20, "start_step": 0, "wall_s": 23.62,
         "tokens": 28506, "tokens_per_s": 1206.9, "peak_memory_gib": None, "peak_rss_gib": 0.612,
         "first_loss": 10.95, "final_loss": 2.5, "examples": 3360, "params_total": 3420608,
         "params_trainable": 3420608},
        {"stage": "polish", "kind": "sft", "adapter": "full", "steps": 10, "start_step": 4, "wall_s": 7.5,
         "tokens": 8560, "tokens_per_s": 1141.3, "peak_memory_gib": None, "peak_rss_gib": 0.655,
         "first_loss": 2.2, "final_loss": 1.9, "examples": 3360},
    ],
}


def _metrics_lines() -> list[str]:
    records = [{"stage": "sft", "step": i + 1, "loss": loss} for i, loss in enumerate(SFT_LOSSES)]
    records += [{"stage": "polish", "step": s, "loss": loss} for s, loss in POLISH_FIRST_TRY + POLISH_RESUMED]
    lines = []
    for r in records:
        r.update(epoch=0.1, lr=1e-3, grad_norm=1.0, tokens_per_s=1200.0, peak_rss_gib=0.5)
        lines.append(json.dumps(r, sort_keys=True))
    return lines


def _build(tmp_path: Path, *, plan: dict | None = None, train_report: dict | None = TRAIN_REPORT,
           metrics: list[str] | None = None, eval_report: dict | None = None) -> Path:
    build = tmp_path / "tiny-run"
    build.mkdir(parents=True)
    (build / "plan.json").write_text(json.dumps(plan if plan is not None else json.loads(PLAN.read_text())))
    if train_report is not None:
        (build / "train_report.json").write_text(json.dumps(train_report))
    lines = metrics if metrics is not None else _metrics_lines()
    (build / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines))
    if eval_report is not None:
        (build / "eval.json").write_text(json.dumps(eval_report))
    return build


def _stage(report: dict, name: str) -> dict:
    return next(s for s in report["stages"] if s["stage"] == name)


def test_each_quantity_is_planned_beside_actual_with_their_ratio(tmp_path: Path) -> None:
    report = build_run_report(_build(tmp_path))
    plan = json.loads(PLAN.read_text())
    planned = plan["stages"][0]
    ran = TRAIN_REPORT["stages"][0]
    sft = _stage(report, "sft")
    assert [s["stage"] for s in report["stages"]] == ["sft", "polish"]

    assert sft["wall_s"] == {"planned": 1.9, "actual": 23.62, "ratio": pytest.approx(23.62 / 1.9, rel=1e-3)}
    planned_rate = planned["train_tokens"] / planned["compute"]["wall_s"]  # 28526 tokens in 1.9 s
    assert sft["tokens_per_s"]["planned"] == pytest.approx(planned_rate, abs=0.05)
    assert sft["tokens_per_s"]["ratio"] == pytest.approx(1206.9 / planned_rate, rel=1e-3)
    # On CPU the measured peak is the process's RSS, named as such.
    assert sft["peak_memory_gib"] == {
        "planned": 0.139, "actual": 0.612, "ratio": pytest.approx(0.612 / 0.139, rel=1e-3), "measured": "process_rss"
    }
    assert sft["steps"] == {"planned": 20, "actual": 20, "ratio": 1.0}
    assert sft["tokens"]["ratio"] == pytest.approx(ran["tokens"] / planned["train_tokens"], rel=1e-3)
    assert sft["train_examples"] == {"planned": 3360, "actual": 3360, "ratio": 1.0}
    assert sft["params_trainable"] == {"planned": 3420608, "actual": 3420608, "ratio": 1.0}
    assert _stage(report, "polish")["params_total"] == {"planned": 3420608, "actual": None, "ratio": None}
    assert sft["truncation"] == {"examples": 4200, "n_positions": 64, "truncated_examples": 39,
                                 "label_truncated_examples": 0, "dropped_examples": 0, "tokens_removed": 134}
    # The train report's losses come first; the lowest logged one is read from the metrics.
    assert sft["loss"]["first"] == 10.95 and sft["loss"]["final"] == 2.5
    assert sft["loss"]["lowest_logged"] == min(SFT_LOSSES) and sft["loss"]["logged_steps"] == len(SFT_LOSSES)

    totals = report["totals"]
    assert totals["wall_s"]["actual"] == pytest.approx(23.62 + 7.5)
    assert totals["wall_s"]["ratio"] == pytest.approx((23.62 + 7.5) / plan["totals"]["wall_s"], rel=1e-3)
    assert totals["tokens"]["actual"] == 28506 + 8560
    assert totals["peak_memory_gib"]["actual"] == 0.655
    assert report["device"] == "cpu" and report["world_size"] == 1 and report["name"] == "tiny-run"


def test_a_step_logged_twice_after_a_resume_keeps_the_later_record(tmp_path: Path) -> None:
    build = _build(tmp_path)
    polish = read_metrics(build / "metrics.jsonl")["polish"]
    assert [(r.step, r.loss) for r in polish] == [(2, 2.4), (4, 2.3), (5, 2.2), (6, 2.1), (8, 2.0), (10, 1.9)]

    # Without first/final losses in the train report, they come from the deduplicated metrics.
    stripped = {"stages": [{k: s[k] for k in ("stage", "steps", "wall_s", "tokens", "tokens_per_s")}
                           for s in TRAIN_REPORT["stages"]]}
    loss = _stage(build_run_report(_build(tmp_path / "old", train_report=stripped)), "polish")["loss"]
    assert loss == {"first": 2.4, "final": 1.9, "lowest_logged": 1.9, "first_logged_step": 2,
                    "last_logged_step": 10, "logged_steps": 6}
    assert _stage(build_run_report(build), "polish")["start_step"] == 4


def test_files_written_json_sorted_markdown_table_and_loss_plot(tmp_path: Path) -> None:
    build = _build(tmp_path, eval_report={"accuracy": 0.664, "majority_baseline": 0.534, "macro_f1": 0.51,
                                          "n": 840, "per_class": {}})
    json_path, md_path = write_run_report(build)
    text = json_path.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert json.loads(text)["eval"] == {"accuracy": 0.664, "majority_baseline": 0.534, "macro_f1": 0.51, "n": 840}

    md = md_path.read_text()
    assert "| quantity | planned | actual | actual/planned |" in md
    assert f"| wall time, s | 1.9 | 23.6 | {23.62 / 1.9:.2f} |" in md
    assert f"| peak memory, GiB (process RSS) | 0.139 | 0.612 | {0.612 / 0.139:.2f} |" in md
    assert "![loss](loss.png)" in md
    assert "resident set (RSS)" in md and "indicative" in md
    assert "39 of 4,200 examples truncated (134 tokens removed)" in md
    assert "Resumed from a checkpoint at step 4." in md
    assert "| trainable parameters | 3,420,608 | 3,420,608 | 1.00 |" in md
    assert "accuracy 66.4% on 840 examples (majority-class baseline 53.4%, +13.0 points)" in md
    assert md.rstrip("\n").splitlines()[-1].startswith("Run: 2 stages run, 31.1 s (planned 2.8 s)")
    assert not [p.name for p in build.iterdir() if p.name.endswith(".tmp")]


def test_loss_plot_is_a_png_and_identical_when_written_again(tmp_path: Path) -> None:
    build = _build(tmp_path)
    write_run_report(build)
    png = (build / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < len(png) < 500_000
    write_run_report(build)
    assert (build / "loss.png").read_bytes() == png
    assert b"Software" not in png and b"matplotlib" not in png


def test_no_logged_loss_means_no_plot(tmp_path: Path) -> None:
    build = _build(tmp_path, metrics=['{"stage": "sft", "step": 1, "loss": NaN}', '{"stage": "sft", "st'])
    assert plot_loss(build / "metrics.jsonl", build / "loss.png") is None
    assert plot_loss(build / "absent.jsonl", build / "loss.png") is None
    _, md_path = write_run_report(build)
    assert not (build / "loss.png").exists()
    assert "![loss]" not in md_path.read_text()


def test_missing_pieces_read_as_none(tmp_path: Path) -> None:
    plan = json.loads(PLAN.read_text())
    for stage in plan["stages"]:
        del stage["memory"], stage["compute"], stage["tokens"]
    del plan["totals"], plan["hardware"], plan["summary"]
    build = _build(tmp_path, plan=plan, train_report=None, metrics=[])
    report = build_run_report(build)
    sft = _stage(report, "sft")
    assert sft["ran"] is False and sft["start_step"] is None
    assert sft["wall_s"] == {"planned": None, "actual": None, "ratio": None}
    assert sft["peak_memory_gib"]["measured"] is None and sft["truncation"] is None
    assert report["totals"]["tokens_per_s"] == {"planned": None, "actual": None, "ratio": None}
    _, md_path = write_run_report(build)
    assert "has not run" in md_path.read_text()

    # A build that only has runtime.json (no plan), with a train report of the oldest shape.
    old = tmp_path / "old"
    old.mkdir()
    (old / "runtime.json").write_text("{}")
    (old / "train_report.json").write_text(json.dumps(
        {"stages": [{"stage": "sft", "steps": 20, "wall_s": 23.62, "tokens": 28506, "tokens_per_s": 1206.9}]}))
    report = build_run_report(old)
    assert report["name"] == "old" and report["device"] is None
    assert _stage(report, "sft")["wall_s"] == {"planned": None, "actual": 23.62, "ratio": None}
    write_run_report(old)


def test_cuda_run_compares_allocated_memory(tmp_path: Path) -> None:
    plan = json.loads(PLAN.read_text())
    plan["hardware"]["device"] = "cuda"
    train = {"device": "cuda", "world_size": 2, "stages": [
        {"stage": "sft", "steps": 20, "wall_s": 3.0, "tokens": 28506, "tokens_per_s": 9502.0,
         "peak_memory_gib": 0.2, "peak_rss_gib": 3.1}]}
    report = build_run_report(_build(tmp_path, plan=plan, train_report=train))
    memory = _stage(report, "sft")["peak_memory_gib"]
    assert memory == {"planned": 0.139, "actual": 0.2, "ratio": pytest.approx(0.2 / 0.139, rel=1e-3),
                      "measured": "cuda_allocated"}
    assert report["world_size"] == 2
    # A stage that has not run yet stays in the report, planned only.
    assert _stage(report, "polish")["ran"] is False


def test_cli_refuses_a_directory_that_is_not_a_build(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-m", "runtime.report", str(tmp_path / "nothing")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "is not a build directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cli_writes_the_report_and_rejects_a_corrupt_train_report(tmp_path: Path, capsys) -> None:
    build = _build(tmp_path)
    assert main([str(build)]) == 0
    assert capsys.readouterr().out.startswith("Run: 2 stages run")
    assert {"run_report.json", "run_report.md", "loss.png"} <= {p.name for p in build.iterdir()}

    (build / "train_report.json").write_text('{"stages": [')
    with pytest.raises(RunReportError, match="train_report.json is not valid JSON"):
        build_run_report(build)
    assert main([str(build)]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_importing_the_report_does_not_load_matplotlib() -> None:
    code = "import sys, runtime.report; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert result.stdout.strip() == "False"
