"""The plan: the machine-readable `plan.json` (`compiler.views.plan_md` renders plan.md from it).

Every value the compiler chose appears under `derived` with the reason it was chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from compiler.diagnostics import Diagnostic
from compiler.emission.packing import packing_entry
from compiler.estimation.catalog import ModelFacts
from compiler.estimation.estimate import GIB
from compiler.estimation.params import Architecture, ParameterCount, active_parameters, routes_experts
from compiler.loading.loader import LoadedRecipe, display_path
from compiler.loading.overrides import Override
from compiler.views.plan_md import summary_line
from runtime.contract.artifacts import PLAN_FORMAT_VERSION
from runtime.contract.config import RuntimeConfig
from runtime.contract.packing import PACKED_KINDS

if TYPE_CHECKING:
    from compiler.data.prepare import PreparedData
    from compiler.estimation.stages import StageEstimate
    from compiler.rules.meta_rules import MetaCheck


def build_plan(
    *,
    loaded: LoadedRecipe,
    config: RuntimeConfig,
    facts: ModelFacts,
    arch: Architecture,
    total_parameters: ParameterCount,
    meta_check: MetaCheck | None = None,
    prepared: dict[str, PreparedData],
    estimates: Sequence[StageEstimate],
    encoder_source: str | None,
    overrides: Sequence[Override],
    warnings: Sequence[Diagnostic],
) -> dict[str, Any]:
    recipe = loaded.recipe
    world = config.hardware.nodes * config.hardware.nproc_per_node
    stages = []
    for stage, est in zip(config.stages, estimates):
        stages.append(
            {
                "name": stage.name,
                "kind": stage.kind,
                "data": stage.data,
                "from": stage.start,
                "adapter": stage.adapter.kind,
                "params": {
                    "total": est.total_parameters,
                    "trainable": est.trainable_parameters,
                    "trainable_fraction": round(est.trainable_parameters / est.total_parameters, 6),
                    **({"active": active_parameters(arch)} if routes_experts(arch) else {}),
                },
                "epochs": stage.epochs if stage.max_steps is None else None,
                "max_steps": stage.max_steps,
                "global_batch_size": stage.micro_batch_size * stage.grad_accum * world,
                "steps": est.steps,
                "train_tokens": est.tokens,
                "tokens_measured": prepared[stage.data].measured,
                "tokens": _stage_tokens(prepared[stage.data]),
                **({"packing": packed} if (packed := packing_entry(stage.packing and stage.kind in PACKED_KINDS, prepared[stage.data])) else {}),
                "memory": _memory_entry(est),
                "compute": {
                    "flops": est.flops,
                    "device": est.device.name,
                    "peak_tflops": est.device.peak_tflops,
                    "mfu": est.device.mfu,
                    "wall_s": round(est.wall_s, 1) if est.wall_s is not None else None,
                    "overhead_s": round(est.overhead_s, 1),
                    "gpu_hours": round(est.gpu_hours, 3) if est.gpu_hours is not None else None,
                    "cost_usd": round(est.cost_usd, 2) if est.cost_usd is not None else None,
                },
            }
        )
    model = config.model
    model_source = (
        "scratch"
        if model.init == "scratch"
        else (model.weights.hub or model.weights.asset or model.weights.path) if model.weights else "?"
    )
    derived = _derived(loaded, config, prepared, encoder_source)
    totals = {
        "flops": sum(e.flops for e in estimates),
        "train_tokens": sum(e.tokens for e in estimates),
        "wall_s": _sum_or_none([e.wall_s for e in estimates], 1),
        "gpu_hours": _sum_or_none([e.gpu_hours for e in estimates], 3),
        "cost_usd": _sum_or_none([e.cost_usd for e in estimates], 2),
        "peak_gib": max(s["memory"]["peak_gib"] for s in stages),
        "device_gib": stages[0]["memory"]["device_gib"],
        "fits": None if any(s["memory"]["fits"] is None for s in stages) else all(s["memory"]["fits"] for s in stages),
    }
    plan = {
        "format_version": PLAN_FORMAT_VERSION,
        "name": recipe.name,
        "description": recipe.description,
        "recipe_file": display_path(loaded.path),
        "overrides": [o.text for o in overrides],
        "model": {
            "init": model.init,
            "family": facts.family,
            "architecture_from": facts.name,
            "weights": model_source,
            "hidden_size": arch.hidden,
            "layers": arch.layers,
            "heads": arch.heads,
            "kv_heads": arch.kv_heads,
            "n_positions": model.n_positions,
            "vocab_size": arch.vocab_size,
            "parameters": {
                "total": total_parameters.total,
                "embedding": total_parameters.embedding,
                "non_embedding": total_parameters.non_embedding,
                **({"vision": total_parameters.vision} if total_parameters.vision else {}),
                **({"active": active_parameters(arch)} if routes_experts(arch) else {}),
            },
            **_model_extras(arch, meta_check),
        },
        "tokenizer": encoder_source or "not available at compile time (loaded by the runtime)",
        "derived": derived,
        "data": {name: _data_entry(p) for name, p in prepared.items()},
        "stages": stages,
        "totals": totals,
        "hardware": {
            "device": config.hardware.device,
            "gpu": config.hardware.gpu,
            "nodes": config.hardware.nodes,
            "nproc_per_node": config.hardware.nproc_per_node,
            "precision": config.hardware.precision,
            "zero_stage": config.hardware.zero_stage,
            "gradient_checkpointing": config.hardware.gradient_checkpointing,
            "host_memory": config.hardware.host_memory,
        },
        "warnings": [d.message for d in warnings],
        "summary": summary_line(stages, totals, config.hardware.device),
    }
    code = code_to_run(config)
    if code:
        plan["code_to_run"] = code
    return plan


def code_to_run(config: RuntimeConfig) -> list[dict[str, str]]:
    """The recipe's own Python functions that training will import and call (python rewards)."""
    return [{"stage": s.name, "reward": r["name"], "function": r["function"]}
            for s in config.stages if s.kind == "grpo" for r in s.params["rewards"] if r["kind"] == "python"]


def _model_extras(arch: Architecture, meta_check: MetaCheck | None) -> dict[str, Any]:
    """Mixture-of-experts facts, and how the counts were obtained when a meta model was built."""
    from compiler.rules.meta_rules import GENERIC_TERMS

    out: dict[str, Any] = {}
    if arch.sparse_layers:
        out["experts"] = {"routed": arch.experts, "per_token": arch.experts_per_token,
                          "expert_intermediate": arch.expert_intermediate, "sparse_layers": arch.sparse_layers,
                          "shared_intermediate": arch.shared_intermediate}
    elif arch.meta is not None and arch.meta.routed:
        out["experts"] = {"routed": arch.meta.routed[0][0], "per_token": arch.meta.experts_per_token,
                          "expert_parameters": arch.meta.routed[0][1], "sparse_layers": len(arch.meta.routed)}
    if meta_check is not None and meta_check.checked:
        out["counted_by"] = "meta model" if meta_check.generic else "formula, equal to the meta model"
    if meta_check is not None and meta_check.generic:
        out["generic_terms"] = list(GENERIC_TERMS)
    return out


_TOTAL_KEYS = ("min", "p50", "p90", "p95", "p99", "max")


def _stage_tokens(p: PreparedData) -> dict[str, Any]:
    """The token facts of the data a stage trains on (names read by other tools: keep them)."""
    b = p.budget
    total = b.get("before_truncation", {}).get("total") if b["measured"] else None
    return {
        "n_positions": p.max_total_tokens,
        "train_examples": b["train_examples"],
        "eval_examples": b["eval_examples"],
        "truncated_examples": b["truncated_examples"],
        "label_truncated_examples": b["label_truncated_examples"],
        "dropped_examples": b["dropped_examples"],
        "total": {k: total[k] for k in _TOTAL_KEYS} if total else None,
    }


def _data_entry(p: PreparedData) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "source": p.source_label,
        "format": p.format,
        "rows": len(p.split.train) + len(p.split.heldout),
        "split": {
            "seed": p.split.seed,
            "heldout_fraction": p.split.heldout_fraction,
            "train": len(p.split.train),
            "heldout": len(p.split.heldout),
            "heldout_lines_sha256": p.split.heldout_lines_sha256(),
        },
        "tokens": p.budget,
        "checks": p.checks,
        "template": p.template.chat_name or "prompt/completion",
        "loss": p.template.loss,
    }
    if p.label_counts:
        train, heldout = p.label_counts["train"], p.label_counts["heldout"]
        majority = max(sorted(train), key=lambda k: train[k])
        entry["labels"] = p.label_counts
        entry["majority_class"] = majority
        entry["majority_baseline_heldout"] = round(heldout.get(majority, 0) / max(1, len(p.split.heldout)), 4)
    return entry


def _derived(loaded: LoadedRecipe, config: RuntimeConfig, prepared: dict[str, PreparedData],
             encoder_source: str | None) -> list[dict[str, Any]]:
    recipe = loaded.recipe
    out = []
    for name, p in prepared.items():
        out.append({"key": f"data.{name}: tokens.max_total", "value": p.max_total_tokens, "reason": p.budget["reason"]})
    if config.model.init == "scratch":
        n_pos_auto = getattr(recipe.model, "n_positions", None) == "auto"
        out.append({
            "key": "model.n_positions",
            "value": config.model.n_positions,
            "reason": "model.n_positions = \"auto\": the largest token budget of the data sets ("
            + "; ".join(p.budget["reason"] for p in prepared.values()) + ")"
            if n_pos_auto else "set in the recipe",
        })
        out.append({"key": "model.vocab_size", "value": config.model.vocab_size,
                    "reason": f"size of the tokenizer ({encoder_source})"})
    else:
        out.append({"key": "model.n_positions", "value": config.model.n_positions,
                    "reason": "the checkpoint's context length (max_position_embeddings)"})
    for stage, spec in zip(recipe.stages, config.stages):
        ratio = stage.warmup_ratio if stage.warmup_ratio is not None else (
            recipe.train.warmup_ratio if stage.warmup_steps is None else None)
        if ratio is not None:
            out.append({"key": f"stages.{stage.name}.warmup_steps", "value": spec.warmup_steps,
                        "reason": f"warmup_ratio = {ratio} of the stage's planned steps, rounded up"})
    for spec in config.stages:
        if spec.early_stopping_patience:
            out.append({"key": f"stages.{spec.name}.steps", "value": "an upper bound",
                        "reason": f"early_stopping_patience = {spec.early_stopping_patience}: the stage stops after "
                        f"that many evaluations (every {spec.eval_every_steps} steps) without a lower held-out loss"})
    if config.eval is not None:
        out.append({
            "key": "eval.max_new_tokens",
            "value": config.eval.max_new_tokens,
            "reason": "set in the recipe" if recipe.eval.max_new_tokens != "auto"
            else "longest completion in the data" if prepared[config.eval.data].measured
            else "default for data whose lengths were not measured",
        })
        if config.eval.labels:
            out.append({"key": "eval.labels", "value": list(config.eval.labels),
                        "reason": f'classes of "{config.eval.label_field}"'})
    return out


def _sum_or_none(values: Sequence[float | None], digits: int) -> float | None:
    return None if any(v is None for v in values) else round(sum(values), digits)


def _memory_entry(est: StageEstimate) -> dict[str, Any]:
    """Per-device memory: the peak, the device, the verdict, the breakdown, and what would fit."""
    device = est.device.memory_gib
    peak = est.memory.peak_bytes / GIB
    return {
        "peak_gib": round(peak, 3),
        "device_gib": device,
        "fits": est.fits,
        "headroom_gib": round(device - peak, 3) if device else None,
        "breakdown_gib": {k: round(v / GIB, 3) for k, v in est.memory.breakdown().items()},
        "logits_why": est.logits_why,
        "suggestions": [
            {"change": s.change, "peak_gib": round(s.memory.peak_bytes / GIB, 3), "fits": s.fits,
             "time_factor": s.time_factor}
            for s in est.suggestions
        ],
    }
