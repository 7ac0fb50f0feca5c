"""Experiment trackers (`report_to`): TensorBoard, Weights & Biases, MLflow.

Rank 0 opens one tracker run per stage. Each gets the scalars of every metrics.jsonl row (the
same names and steps), the resolved runtime config, and the plan's headline numbers for the
stage as run parameters (`plan/...`), so a tracker's table sets the plan beside what happened.

Credentials are the trackers' own environment variables (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN,
...): nothing here reads or writes them. Where runs go:
  tensorboard   <build>/runs/<stage>/ (event files)
  wandb         <build>/wandb/ (WANDB_MODE=offline keeps it there; online it also syncs)
  mlflow        MLFLOW_TRACKING_URI, else a file store in <build>/mlruns/
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from runtime.contract.artifacts import MetricsRecord, read_plan
from runtime.contract.config import StageSpec
from runtime.contract.layout import PLAN_JSON, RUNTIME_CONFIG_FILE

TENSORBOARD_DIR = "runs"
WANDB_DIR = "wandb"
MLFLOW_DIR = "mlruns"
# Fields of a metrics row that are not scalars to plot.
NOT_SCALARS = ("format_version", "stage", "step")


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def scalars_of(record: MetricsRecord) -> dict[str, float]:
    """The numbers of a metrics row, by field name; fields the row does not carry are left out."""
    values = record.model_dump(exclude=set(NOT_SCALARS), exclude_none=True)
    return {key: float(value) for key, value in values.items()}


def run_params(build_dir: Path, stage: StageSpec) -> dict[str, Any]:
    """What every tracker gets as run parameters: the stage's resolved config and the plan's
    headline numbers for it (parameters, peak memory per device, planned time, cost, steps)."""
    params: dict[str, Any] = {f"train/{key}": value for key, value in stage.model_dump(mode="json").items()
                              if not isinstance(value, (dict, list))}
    params["train/adapter"] = stage.adapter.kind
    planned = read_plan(build_dir / PLAN_JSON).stage(stage.name)
    if planned is not None:
        headline = {
            "plan/steps": planned.steps,
            "plan/train_tokens": planned.train_tokens,
            "plan/params_total": planned.params.total if planned.params else None,
            "plan/params_trainable": planned.params.trainable if planned.params else None,
            "plan/peak_memory_gib": planned.memory.peak_gib if planned.memory else None,
            "plan/wall_s": planned.compute.wall_s if planned.compute else None,
            "plan/cost_usd": planned.compute.cost_usd if planned.compute else None,
        }
        params.update({key: value for key, value in headline.items() if value is not None})
    return params


class TensorBoard:
    def __init__(self, build_dir: Path, run_name: str, stage: StageSpec, params: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(build_dir / TENSORBOARD_DIR / stage.name))
        self.writer.add_text("runtime_config", _code((build_dir / RUNTIME_CONFIG_FILE).read_text()))
        self.writer.add_text("params", _code(json.dumps(params, indent=2, sort_keys=True)))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, build_dir: Path, run_name: str, stage: StageSpec, params: dict[str, Any]):
        import wandb

        config = json.loads((build_dir / RUNTIME_CONFIG_FILE).read_text())
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", run_name), name=f"{run_name}/{stage.name}",
            group=run_name, dir=str(build_dir), config={"runtime": config, **params}, reinit="create_new",
            # No console capture, code or git state: the run holds what this module logs.
            settings=wandb.Settings(console="off", save_code=False, disable_git=True),
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    def __init__(self, build_dir: Path, run_name: str, stage: StageSpec, params: dict[str, Any]):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # A file store in the build: mlflow-skinny's local store, which MLflow 3 keeps working
            # only on request (its database store needs the full mlflow package).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (build_dir / MLFLOW_DIR).absolute().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(run_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(run_name)
        self.run_id = self.client.create_run(experiment_id, run_name=stage.name).info.run_id
        for key, value in params.items():
            self.client.log_param(self.run_id, key, value)
        self.client.log_text(self.run_id, (build_dir / RUNTIME_CONFIG_FILE).read_text(), RUNTIME_CONFIG_FILE)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS: dict[str, type] = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}


def open_trackers(build_dir: Path, run_name: str, stage: StageSpec) -> list[Tracker]:
    """The stage's trackers, opened (rank 0 only calls this)."""
    if not stage.report_to:
        return []
    params = run_params(build_dir, stage)
    return [TRACKERS[name](build_dir, run_name, stage, params) for name in stage.report_to]


def _code(text: str) -> str:
    """TensorBoard renders text as markdown; indented, it shows as written."""
    return "\n".join("    " + line for line in text.splitlines())
