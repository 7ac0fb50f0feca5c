"""Compile a recipe into a build directory: the contract the runtime executes.

Everything written here is deterministic (sorted keys, no timestamps, hostnames or absolute
paths), so recompiling an unchanged recipe gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from compiler import plan as plan_module
from compiler.assets import AssetError, AssetSpec, asset_path, load_catalog
from compiler.budget import BudgetError, BudgetRequest, Example, TemplateRowError, TokenBudget, plan_budget
from compiler.checks import resolve_data_path
from compiler.data import Row, Split, read_rows, split_rows
from compiler.diagnostics import Diagnostic, RecipeError
from compiler.estimate import Gpt2Shape, gpt2_parameters, gpt2_train_flops, gpt2_train_memory
from compiler.loader import LoadedRecipe, display_path
from compiler.templating import compile_template
from compiler.tokenizer import Encoder, load_encoder
from compiler.validate import validate
from runtime.config import (
    SCHEMA_VERSION,
    DataSpec,
    EvalSpec,
    HardwareSpec,
    ModelSpec,
    RuntimeConfig,
    StageSpec,
    TemplateSpec,
    TokenizerSpec,
)

MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Build:
    """A compiled recipe held in memory: relative path -> file content."""

    name: str
    files: dict[str, bytes]
    plan: dict
    warnings: tuple[Diagnostic, ...]


def compile_recipe(path: Path) -> Build:
    """Validate, read and measure the data, choose budgets, estimate, and render the build files."""
    loaded, warnings = validate(path)
    recipe = loaded.recipe
    catalog = load_catalog()
    rows, data_file, data_label = _read_data(loaded, catalog)
    split = split_rows(rows, recipe.data.split.heldout_fraction, recipe.data.split.seed)
    encoder = _load_encoder(loaded, catalog)
    budget, examples = _budget(loaded, split, encoder, data_label)
    by_line = {e.line: e for e in examples}
    train = [by_line[r.line] for r in split.train]
    heldout = [by_line[r.line] for r in split.heldout]

    config = _runtime_config(loaded, encoder, budget, split)
    shape = Gpt2Shape(
        vocab_size=config.model.vocab_size,
        n_positions=config.model.n_positions,
        n_embd=config.model.n_embd,
        n_layer=config.model.n_layer,
        n_head=config.model.n_head,
    )
    label_field = recipe.eval.label_field
    files: dict[str, bytes] = {
        "runtime.json": config.to_json().encode(),
        config.tokenizer.file: encoder.json.encode(),
        config.data.train: _jsonl(train, split.train, label_field),
        config.data.heldout: _jsonl(heldout, split.heldout, label_field),
    }
    plan = plan_module.build_plan(
        loaded=loaded,
        config=config,
        shape=shape,
        budget=budget,
        split=split,
        train=train,
        data_label=data_label,
        parameters=gpt2_parameters(shape),
        flops_by_stage=[_stage_flops(shape, s, train) for s in config.stages],
        memory_by_stage=[_stage_memory(shape, s, config, budget) for s in config.stages],
        label_counts=_label_counts(split, label_field),
        warnings=warnings,
    )
    files["plan.json"] = (json.dumps(plan, indent=2, sort_keys=True) + "\n").encode()
    files["plan.md"] = plan_module.render_markdown(plan).encode()
    files["launch.sh"] = plan_module.render_launch(config, display_path(loaded.path)).encode()
    files[MANIFEST_FILE] = _manifest(loaded, files, data_file).encode()
    return Build(name=recipe.name, files=files, plan=plan, warnings=tuple(warnings))


def write_build(build: Build, out_dir: Path) -> None:
    """Write each file atomically (temp file, then rename) and remove artifacts a previous compile
    wrote that this one no longer produces. Run outputs (model, metrics, eval) are left alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_artifacts(out_dir)
    for rel, content in sorted(build.files.items()):
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file() and target.read_bytes() == content:
            continue
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(content)
        if rel.endswith(".sh"):
            tmp.chmod(0o755)
        os.replace(tmp, target)
    for rel in previous - set(build.files):
        stale = out_dir / rel
        if stale.is_file():
            stale.unlink()


def _previous_artifacts(out_dir: Path) -> set[str]:
    manifest = out_dir / MANIFEST_FILE
    try:
        return set(json.loads(manifest.read_text())["files"]) | {MANIFEST_FILE}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


# ---------------------------------------------------------------------------------------------


def _read_data(loaded: LoadedRecipe, catalog: dict[str, AssetSpec]) -> tuple[list[Row], Path, str]:
    source = loaded.recipe.data.source
    if source.asset is not None:
        try:
            path = asset_path(catalog[source.asset])
        except AssetError as exc:
            raise RecipeError.single(str(exc), **loaded.where(("data", "source", "asset"))) from None
        label = f"asset:{source.asset}/{path.name}"
    else:
        path = resolve_data_path(loaded.path, source.path)
        label = display_path(path)
    rows = read_rows(path, loaded.recipe.data, label)
    if not rows:
        raise RecipeError.single(f"{label} has no rows", **loaded.where(("data", "source")))
    return rows, path, label


def _load_encoder(loaded: LoadedRecipe, catalog: dict[str, AssetSpec]) -> Encoder:
    try:
        return load_encoder(loaded.recipe.tokenizer, catalog[loaded.recipe.tokenizer.asset])
    except AssetError as exc:
        raise RecipeError.single(str(exc), **loaded.where(("tokenizer", "asset"))) from None


def _budget(loaded: LoadedRecipe, split: Split, encoder: Encoder, data_label: str) -> tuple[TokenBudget, list[Example]]:
    r = loaded.recipe
    eos_ids = (encoder.token_id(r.tokenizer.eos_token),) if r.template.add_eos else ()
    request = BudgetRequest(
        max_total_tokens=None if r.budget.max_total_tokens == "auto" else r.budget.max_total_tokens,
        coverage=r.budget.coverage,
        round_to=r.budget.round_to,
        n_positions_cap=None if r.model.n_positions == "auto" else r.model.n_positions,
        truncatable=tuple(r.budget.truncatable),
        eos_ids=eos_ids,
    )
    rows = list(split.train) + list(split.heldout)
    try:
        return plan_budget(
            rows, compile_template(r.template.prompt), compile_template(r.template.completion), encoder, request
        )
    except TemplateRowError as exc:
        raise RecipeError(
            [
                Diagnostic("error", f"rendering row failed: {exc}", file=data_label, line=exc.line),
                Diagnostic("error", "while rendering this template", **loaded.where(("template",))),
            ]
        ) from None
    except BudgetError as exc:
        lines = ", ".join(str(n) for n in exc.lines[:10]) + (" ..." if len(exc.lines) > 10 else "")
        raise RecipeError.single(
            str(exc) + (f" (rows at lines {lines} of {data_label})" if exc.lines else ""),
            help="raise budget.max_total_tokens, shorten the template, or mark more fields truncatable",
            **loaded.where(("budget",)),
        ) from None


def _runtime_config(loaded: LoadedRecipe, encoder: Encoder, budget: TokenBudget, split: Split) -> RuntimeConfig:
    r = loaded.recipe
    eos_id = encoder.token_id(r.tokenizer.eos_token)
    n_positions = budget.max_total_tokens if r.model.n_positions == "auto" else r.model.n_positions
    labels = _eval_labels(loaded, split)
    max_new = budget.max_completion_tokens if r.eval.max_new_tokens == "auto" else r.eval.max_new_tokens
    return RuntimeConfig(
        schema_version=SCHEMA_VERSION,
        name=r.name,
        seed=r.seed,
        model=ModelSpec(
            architecture=r.model.architecture,
            init=r.model.init,
            vocab_size=encoder.vocab_size,
            n_positions=n_positions,
            n_embd=r.model.n_embd,
            n_layer=r.model.n_layer,
            n_head=r.model.n_head,
            dropout=r.model.dropout,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        ),
        tokenizer=TokenizerSpec(file="tokenizer/tokenizer.json", eos_token=r.tokenizer.eos_token),
        template=TemplateSpec(prompt=r.template.prompt, completion=r.template.completion, add_eos=r.template.add_eos),
        data=DataSpec(
            train="data/train.jsonl",
            heldout="data/heldout.jsonl",
            n_train=len(split.train),
            n_heldout=len(split.heldout),
        ),
        stages=tuple(
            StageSpec(
                name=s.name,
                kind=s.kind,
                epochs=s.epochs,
                micro_batch_size=s.micro_batch_size,
                grad_accum=s.grad_accum,
                learning_rate=s.learning_rate,
                lr_schedule=s.lr_schedule,
                warmup_steps=s.warmup_steps,
                weight_decay=s.weight_decay,
                max_grad_norm=s.max_grad_norm,
                adam_betas=s.adam_betas,
                log_every_steps=s.log_every_steps,
                length_grouping=s.length_grouping,
            )
            for s in r.stages
        ),
        eval=EvalSpec(
            kind=r.eval.kind,
            label_field=r.eval.label_field,
            labels=labels,
            extract=r.eval.extract,
            max_new_tokens=max_new,
            batch_size=r.eval.batch_size,
        ),
        hardware=HardwareSpec(
            device=r.hardware.device,
            nproc_per_node=r.hardware.nproc_per_node,
            nodes=r.hardware.nodes,
            precision=r.hardware.precision,
        ),
    )


def _eval_labels(loaded: LoadedRecipe, split: Split) -> tuple[str, ...]:
    field = loaded.recipe.eval.label_field
    for derive in loaded.recipe.data.derive:
        if derive.name == field:
            return tuple(derive.labels)
    values = {str(r.fields.get(field)) for r in (*split.train, *split.heldout)}
    return tuple(sorted(values))


def _label_counts(split: Split, field: str) -> dict[str, dict[str, int]]:
    return {
        "train": dict(sorted(Counter(str(r.fields[field]) for r in split.train).items())),
        "heldout": dict(sorted(Counter(str(r.fields[field]) for r in split.heldout).items())),
    }


def world_size(config: RuntimeConfig) -> int:
    return config.hardware.nodes * config.hardware.nproc_per_node


def steps_per_epoch(stage: StageSpec, n_train: int, world: int) -> int:
    return math.ceil(n_train / (stage.micro_batch_size * stage.grad_accum * world))


def _stage_flops(shape: Gpt2Shape, stage: StageSpec, train: list[Example]) -> int:
    tokens = sum(len(e.prompt_ids) + len(e.completion_ids) for e in train)
    supervised = sum(len(e.completion_ids) for e in train)
    return stage.epochs * gpt2_train_flops(
        shape, tokens=tokens, supervised_tokens=supervised, mean_seq_len=tokens / len(train)
    )


def _stage_memory(shape: Gpt2Shape, stage: StageSpec, config: RuntimeConfig, budget: TokenBudget):
    return gpt2_train_memory(
        shape,
        micro_batch_size=stage.micro_batch_size,
        seq_len=budget.max_total_tokens,
        supervised_per_example=budget.max_completion_tokens,
        precision=config.hardware.precision,
        device=config.hardware.device,
    )


def _jsonl(examples: list[Example], rows: tuple[Row, ...], label_field: str) -> bytes:
    lines = []
    for example, row in zip(examples, rows):
        record = {
            "completion": list(example.completion_ids),
            "label": str(row.fields[label_field]),
            "line": example.line,
            "prompt": list(example.prompt_ids),
        }
        lines.append(json.dumps(record, sort_keys=True, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(loaded: LoadedRecipe, files: dict[str, bytes], data_file: Path) -> str:
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "recipe": {"file": Path(display_path(loaded.path)).as_posix(), "sha256": _sha256(loaded.text.encode())},
        "data": {"sha256": _sha256(data_file.read_bytes())},
        "files": {rel: _sha256(content) for rel, content in sorted(files.items())},
    }
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"
