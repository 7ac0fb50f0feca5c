"""The plan: a machine-readable `plan.json`, and `plan.md` rendered from it for humans.

Every value the compiler chose appears under `derived` with the reason it was chosen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jinja2

from compiler.budget import Example, TokenBudget
from compiler.data import Split
from compiler.diagnostics import Diagnostic
from compiler.estimate import GIB, Gpt2Shape, MemoryEstimate, ParameterCount
from compiler.loader import LoadedRecipe, display_path
from compiler.paths import templates_dir
from runtime.config import RuntimeConfig

PLAN_FORMAT_VERSION = 1


def build_plan(
    *,
    loaded: LoadedRecipe,
    config: RuntimeConfig,
    shape: Gpt2Shape,
    budget: TokenBudget,
    split: Split,
    train: Sequence[Example],
    data_label: str,
    parameters: ParameterCount,
    flops_by_stage: Sequence[int],
    memory_by_stage: Sequence[MemoryEstimate],
    label_counts: dict[str, dict[str, int]],
    warnings: Sequence[Diagnostic],
) -> dict[str, Any]:
    recipe = loaded.recipe
    world = config.hardware.nodes * config.hardware.nproc_per_node
    tokens_per_epoch = sum(len(e.prompt_ids) + len(e.completion_ids) for e in train)
    stages = []
    for stage, flops, memory in zip(config.stages, flops_by_stage, memory_by_stage):
        batch = stage.micro_batch_size * stage.grad_accum * world
        steps_per_epoch = -(-config.data.n_train // batch)
        stages.append(
            {
                "name": stage.name,
                "kind": stage.kind,
                "epochs": stage.epochs,
                "global_batch_size": batch,
                "steps": steps_per_epoch * stage.epochs,
                "tokens": tokens_per_epoch * stage.epochs,
                "train_flops": flops,
                "memory_gib": memory.as_gib(),
            }
        )
    n_positions_reason = (
        f"model.n_positions = \"auto\": equal to the token budget ({budget.reason})"
        if recipe.model.n_positions == "auto"
        else "set in the recipe"
    )
    derived = [
        {"key": "budget.max_total_tokens", "value": budget.max_total_tokens, "reason": budget.reason},
        {"key": "model.n_positions", "value": config.model.n_positions, "reason": n_positions_reason},
        {
            "key": "model.vocab_size",
            "value": config.model.vocab_size,
            "reason": f"size of tokenizer asset {recipe.tokenizer.asset!r}",
        },
        {
            "key": "eval.max_new_tokens",
            "value": config.eval.max_new_tokens,
            "reason": "longest completion in the data"
            if recipe.eval.max_new_tokens == "auto"
            else "set in the recipe",
        },
        {
            "key": "eval.labels",
            "value": list(config.eval.labels),
            "reason": f"classes of {config.eval.label_field!r}",
        },
    ]
    heldout = label_counts["heldout"]
    train_counts = label_counts["train"]
    majority = max(sorted(train_counts), key=lambda k: train_counts[k])
    peak = max(m.total_bytes for m in memory_by_stage)
    return {
        "format_version": PLAN_FORMAT_VERSION,
        "name": recipe.name,
        "recipe_file": display_path(loaded.path),
        "model": {
            "architecture": config.model.architecture,
            "init": config.model.init,
            "n_embd": shape.n_embd,
            "n_layer": shape.n_layer,
            "n_head": shape.n_head,
            "n_positions": shape.n_positions,
            "vocab_size": shape.vocab_size,
            "parameters": {
                "total": parameters.total,
                "trainable": parameters.total,
                "embedding": parameters.embedding,
                "non_embedding": parameters.non_embedding,
            },
        },
        "derived": derived,
        "data": {
            "source": data_label,
            "rows": len(split.train) + len(split.heldout),
            "split": {
                "seed": split.seed,
                "heldout_fraction": split.heldout_fraction,
                "train": len(split.train),
                "heldout": len(split.heldout),
                "heldout_lines_sha256": split.heldout_lines_sha256(),
            },
            "labels": label_counts,
            "majority_class": majority,
            "majority_baseline_heldout": round(heldout.get(majority, 0) / max(1, len(split.heldout)), 4),
        },
        "tokens": {
            "max_total_tokens": budget.max_total_tokens,
            "before_truncation": {
                "prompt": dataclasses.asdict(budget.prompt),
                "completion": dataclasses.asdict(budget.completion),
                "total": dataclasses.asdict(budget.total),
            },
            "fixed_tokens_max": budget.fixed_tokens_max,
            "truncated_examples": budget.n_truncated,
            "truncated_fraction": round(budget.n_truncated / budget.total.count, 4),
            "tokens_removed": budget.tokens_removed,
            "truncatable_fields": list(budget.truncated_fields),
            "completion_truncated_examples": 0,
        },
        "stages": stages,
        "hardware": {
            "device": config.hardware.device,
            "nodes": config.hardware.nodes,
            "nproc_per_node": config.hardware.nproc_per_node,
            "precision": config.hardware.precision,
        },
        "warnings": [d.message for d in warnings],
        "summary": summary_line(stages, peak, config.hardware.device),
    }


def summary_line(stages: Sequence[dict[str, Any]], peak_bytes: int, device: str) -> str:
    tokens = sum(s["tokens"] for s in stages)
    flops = sum(s["train_flops"] for s in stages)
    n = len(stages)
    return (
        f"Plan: {n} stage{'s' * (n != 1)}, {_si(tokens)} tokens, {_si(flops)}FLOP; "
        f"peak {peak_bytes / GIB:.2f} GiB per {device} device"
    )


def _si(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["si"] = _si
    env.filters["thousands"] = lambda v: f"{v:,}"
    return env


def render_markdown(plan: dict[str, Any]) -> str:
    """plan.md is a pure function of plan.json."""
    return _environment().get_template("plan.md.j2").render(plan=plan)


def render_launch(config: RuntimeConfig, recipe_file: str) -> str:
    return _environment().get_template("launch.sh.j2").render(config=config, recipe_file=recipe_file)
