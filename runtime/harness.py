"""`[eval] kind = "harness"`: lm-evaluation-harness tasks on the build's trained model.

The model `recipe eval` loaded (an adapter attached to the weights its stage started from, LoRA
folded in) is handed to the harness as an object through its `HFLM` wrapper, with the build's
tokenizer: nothing is loaded by name, so no hub access is needed for the model. Tasks are the
harness's own or YAML files in the recipe's `task_dirs` (searched first). The figures land in
eval.json under `harness` and in a table of eval.md, beside the held-out loss of the
language-model eval. lm-eval is an optional extra (`pip install "recipe[harness]"`).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import torch

from runtime.contract.config import HARNESS_MISSING, IncompatibleBuildError, RuntimeConfig

# Entries of a task's results that are not metrics.
NOT_METRICS = ("alias", "name", "sample_len", "samples")


def run_harness(model: torch.nn.Module, tokenizer, config: RuntimeConfig) -> dict[str, Any]:
    """The harness's figures for the recipe's tasks: {"lm_eval_version", "num_fewshot", "limit",
    "tasks": {task: {metric: value}}, "samples": {task: examples scored}}."""
    if importlib.util.find_spec("lm_eval") is None:
        raise IncompatibleBuildError(HARNESS_MISSING)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    spec = config.eval
    missing = [folder for folder in spec.task_dirs if not Path(folder).is_dir()]
    if missing:
        raise FileNotFoundError(f"eval.task_dirs: {missing[0]} is not a folder (resolved from {Path.cwd()}); run "
                                "`recipe eval` from the directory the recipe was compiled from")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = config.tokenizer.pad_token or config.tokenizer.eos_token
    if tokenizer.eos_token is None:
        tokenizer.eos_token = config.tokenizer.eos_token
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size, max_length=config.model.n_positions)
    manager = TaskManager(include_path=list(spec.task_dirs) or None)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot,
                                      limit=spec.limit, task_manager=manager, log_samples=False,
                                      random_seed=config.seed, numpy_random_seed=config.seed,
                                      torch_random_seed=config.seed, fewshot_random_seed=config.seed)
    tasks = {task: metrics_of(figures) for task, figures in sorted(results["results"].items())}
    samples = {task: int(n["effective"]) for task, n in sorted(results.get("n-samples", {}).items())}
    return {"lm_eval_version": results.get("lm_eval_version"), "num_fewshot": spec.num_fewshot, "limit": spec.limit,
            "tasks": tasks, "samples": samples}


def metrics_of(figures: dict[str, Any]) -> dict[str, float]:
    """A task's numeric results by the harness's own names (`acc,none`, `acc_stderr,none`); a
    standard error the harness could not compute ("N/A", or NaN for one example) is left out."""
    out = {}
    for key, value in figures.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = round(float(value), 6)
    return out


def harness_md(harness: dict[str, Any]) -> list[str]:
    """eval.md's lines for the harness's results: one row per task and metric."""
    shots = "each task's default" if harness["num_fewshot"] is None else harness["num_fewshot"]
    limit = "all" if harness["limit"] is None else f"at most {harness['limit']}"
    lines = ["## lm-evaluation-harness", "",
             f"lm-eval {harness['lm_eval_version']}; few-shot: {shots}; examples per task: {limit}.", "",
             "| task | examples | metric | value | stderr |", "|---|---:|---|---:|---:|"]
    for task, metrics in harness["tasks"].items():
        for key, value in metrics.items():
            if "_stderr," in key:
                continue
            name, _, filt = key.partition(",")
            stderr = metrics.get(f"{name}_stderr,{filt}")
            shown = f"{stderr:.4f}" if stderr is not None else "-"
            label = name if filt in ("none", "") else f"{name} ({filt})"
            lines.append(f"| {task} | {harness['samples'].get(task, '-')} | {label} | {value:.4f} | {shown} |")
    return lines + [""]
