"""Training: runs the build's stages in order, resumably, and saves what a user can take elsewhere.

Launched by the build's `launch.sh` through torchrun: `python -m runtime.train BUILD_DIR`.
One process or several: DistributedDataParallel (gloo on CPU, NCCL on GPU), or DeepSpeed ZeRO
when the build plans it. Each stage is run by its kind's entry in the registry
(runtime/stages/__init__.py).

What lands in the build directory:
  checkpoints/          every `save_every_steps`, the newest `keep_checkpoints` (runtime/core/checkpoint.py)
  stages/<stage>/       each finished stage's model or adapter, and `done.json` with its report
  model/                the last stage's output: HF model or peft adapter, tokenizer, exact template
  model-merged/         LoRA merged into the base weights, when the adapter asks for `merge`
  metrics.jsonl         one line per logged step; train_report.json; run_report.{json,md}; loss.png
Running again continues from the newest usable checkpoint and skips finished stages. A build
whose plan.json counts other steps than this run would take is refused before anything trains.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn that it guessed

from runtime.contract.artifacts import TRAIN_REPORT_FORMAT_VERSION, TrainReport, dumps, read_plan
from runtime.contract.config import (
    RUNTIME_CONFIG_FILE, IncompatibleBuildError, RuntimeConfig, load_runtime_config, unsupported, uses_deepspeed,
)
from runtime.contract.files import RunLockBusy, run_lock, write_atomic, write_failure
from runtime.contract.layout import CHECKPOINT_DIR, MODEL_DIR, PLAN_JSON, TRAIN_REPORT_FILE
from runtime.core.checkpoint import CheckpointError, latest_usable, remove_stale_staging
from runtime.core.distributed import Dist, select_device, setup_distributed, shutdown_distributed
from runtime.core.host_memory import host_memory_policy, set_host_memory_policy
from runtime.core.loop import check_planned_steps
from runtime.core.model import ModelLoadError, hold_in_precision
from runtime.core.outputs import finish_stage, finished_report, merged, starting_model
from runtime.core.probe import ProbeOutOfMemory
from runtime.core.run import Run
from runtime.report import write_run_report
from runtime.stages import STAGES


@contextlib.contextmanager
def _run_lock(build_dir: Path, d: Dist):
    """One training run per build directory at a time (rank 0 holds the lock)."""
    if not d.is_main:
        yield
        return
    try:
        with run_lock(build_dir):
            yield
    except RunLockBusy:
        raise CheckpointError(
            f"another run is training {build_dir} right now; wait for it to finish "
            "(or compile the recipe into another directory with --out)"
        ) from None


def train(config: RuntimeConfig, build_dir: Path, d: Dist) -> TrainReport:
    """Every stage of the build in order (finished ones skipped), then the train and run reports."""
    check_planned_steps(read_plan(build_dir / PLAN_JSON), config, build_dir, d.world)
    device = select_device(config, d)
    config_sha = hashlib.sha256((build_dir / RUNTIME_CONFIG_FILE).read_bytes()).hexdigest()
    root = build_dir / CHECKPOINT_DIR
    if d.is_main:
        remove_stale_staging(root)
    d.barrier()
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if d.is_main else (lambda m: None)
    resume = latest_usable(root, config_sha, log)
    run = Run(config, build_dir, d, device, config_sha, resume)
    reports = []
    model = None
    previous = None
    for index, stage in enumerate(config.stages):
        last = index == len(config.stages) - 1
        done = finished_report(run, stage)
        if done is not None:  # its output is newer than any of its checkpoints
            run.log(f'stage "{stage.name}" already finished in this build; skipping it')
            reports.append(done)
            model, previous = None, stage.name
            continue
        if model is None or stage.start != previous:
            model = starting_model(config, build_dir, stage)
        model = hold_in_precision(model, config.hardware, trains_whole=stage.adapter.kind == "full").to(device)
        trained, report = STAGES[stage.kind](run, index, stage, model)
        finish_stage(run, stage, trained, report, last)
        d.barrier()
        reports.append(report)
        # After ZeRO-3 the parameters still carry DeepSpeed's partitioning state; the next stage
        # starts from the saved output instead.
        model = None if uses_deepspeed(config.hardware) and config.hardware.zero_stage == 3 else merged(trained)
        previous = stage.name
    train_report = TrainReport(format_version=TRAIN_REPORT_FORMAT_VERSION, device=device.type,
                               precision=config.hardware.precision, world_size=d.world,
                               host_memory=host_memory_policy(), stages=reports)
    if d.is_main:
        write_atomic(build_dir / TRAIN_REPORT_FILE, dumps(train_report).encode())
        write_run_report(build_dir)
    return train_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.train")
    parser.add_argument("build_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        config = load_runtime_config(args.build_dir)
    except IncompatibleBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    missing = unsupported(config)
    if missing:
        print(f"error: this runtime cannot execute {args.build_dir}: " + "; ".join(missing), file=sys.stderr)
        return 1
    # before the model is loaded: the policy applies to every block allocated from then on
    if set_host_memory_policy(config.hardware.host_memory) is None and config.hardware.host_memory == "reuse":
        print('note: hardware.host_memory = "reuse" changes nothing here: the C library is not glibc',
              file=sys.stderr)
    d = setup_distributed(config.hardware.device)
    try:
        with _run_lock(args.build_dir, d):
            train(config, args.build_dir, d)
    except (CheckpointError, ModelLoadError, IncompatibleBuildError, ProbeOutOfMemory) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a model, report or log that found no space; other errors are bugs
        problem = write_failure(args.build_dir, exc)
        if problem is None:
            raise
        print(f"error: could not write {exc.filename or args.build_dir}: {problem}; free some space and run "
              "again (finished stages and checkpoints are kept)", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed(d)
    if d.is_main:
        print(f"saved model, tokenizer and template to {args.build_dir / MODEL_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
