"""The verbs that run a build: train and evaluate it, evaluate it again, chat with its model.

Training and evaluation run in subprocesses (launch.sh, `python -m runtime.evaluate`); the chat
and the report line import the runtime inside the command, so no other command loads torch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from compiler.cli.common import EXIT_OK, EXIT_USER
from compiler.diagnostics import RecipeError
from compiler.views.results import eval_line
from runtime.contract.artifacts import IncompatibleArtifactError, read_eval_report, read_run_report
from runtime.contract.layout import (
    EVAL_JSON,
    LAUNCH_SH,
    MANIFEST_FILE,
    RUN_REPORT_JSON,
    RUN_REPORT_MD,
    RUNTIME_CONFIG_FILE,
)


def cmd_run(args: argparse.Namespace) -> int:
    build_dir = Path(args.build)
    check_build(build_dir)
    _refuse_if_training(build_dir)
    launch = build_dir / LAUNCH_SH
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    result = subprocess.run(["bash", str(launch)], env=env)
    if result.returncode != 0:
        print(f"error: {launch} exited with status {result.returncode}; see the output above", file=sys.stderr)
        return EXIT_USER
    report = build_dir / RUN_REPORT_JSON
    if report.is_file():
        from runtime.report import summary_line

        try:
            print(f"{summary_line(read_run_report(report))}; report: {build_dir / RUN_REPORT_MD}")
        except IncompatibleArtifactError as exc:
            raise RecipeError.single(str(exc)) from None
    _print_eval(build_dir)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    build_dir = Path(args.build)
    check_build(build_dir)
    command = [sys.executable, "-m", "runtime.evaluate", str(build_dir)]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    result = subprocess.run(command, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if result.returncode != 0:
        return EXIT_USER
    _print_eval(build_dir)
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    from runtime.chat import ChatError, run

    build_dir = Path(args.build)
    if not (build_dir / RUNTIME_CONFIG_FILE).is_file():
        raise RecipeError.single(f"{build_dir} is not a build directory (run `recipe compile RECIPE` first)")
    try:
        return run(build_dir, args.prompt)
    except ChatError as exc:
        raise RecipeError.single(str(exc)) from None
    except KeyboardInterrupt:
        return EXIT_OK


def check_build(build_dir: Path) -> None:
    """Refuse a directory that is not a build, or whose compiled files changed since compile.
    First undo any swap of files a killed `recipe compile` or `recipe eval` left half done."""
    import hashlib

    from compiler.emission.build import incomplete_build
    from runtime.contract.config import IncompatibleBuildError, load_runtime_config, unsupported
    from runtime.contract.files import folder_lock, roll_back_interrupted

    if build_dir.is_dir():
        with folder_lock(build_dir):
            restored = roll_back_interrupted(build_dir)
        if incomplete_build(build_dir):
            raise RecipeError.single(
                f"{build_dir} is incomplete: `recipe compile` was interrupted before it finished writing it; "
                f"compile the recipe again (recipe compile RECIPE --out {build_dir})")
        if restored:
            print(f"note: {build_dir}: an interrupted `recipe compile` or `recipe eval` had left files half "
                  "replaced; restored the ones before it", file=sys.stderr)
    try:
        config = load_runtime_config(build_dir)
    except IncompatibleBuildError as exc:
        raise RecipeError.single(str(exc)) from None
    missing = unsupported(config)
    if missing:
        raise RecipeError.single(
            f"{build_dir} compiled, but this runtime cannot execute it yet: " + "; ".join(missing),
            help="the plan (plan.md) is valid; train it with a runtime that supports these features",
        )
    manifest_path = build_dir / MANIFEST_FILE
    try:
        recorded = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RecipeError.single(
            f"{manifest_path} is missing or unreadable", help="recompile the recipe with `recipe compile`"
        ) from None
    changed = []
    for rel, sha256 in sorted(recorded.items()):
        path = build_dir / rel
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            changed.append(rel)
    if changed:
        raise RecipeError.single(
            f"{build_dir} was changed after compile: {', '.join(changed)} no longer match {MANIFEST_FILE}",
            help="edit the recipe and recompile instead of editing build files",
        )


def _refuse_if_training(build_dir: Path) -> None:
    """Say at once, before torchrun starts, that another run holds the build's run lock (training
    checks again itself, which closes the race between two runs started together)."""
    from runtime.contract.files import RunLockBusy, run_lock

    try:
        with run_lock(build_dir, create=False):
            pass
    except RunLockBusy:
        raise RecipeError.single(
            f"another run is training {build_dir} right now; wait for it to finish (or compile the recipe "
            "into another directory with --out)") from None


def _print_eval(build_dir: Path) -> None:
    path = build_dir / EVAL_JSON
    if path.is_file():
        try:
            print(eval_line(read_eval_report(path), path))
        except IncompatibleArtifactError as exc:
            raise RecipeError.single(str(exc)) from None
