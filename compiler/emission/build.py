"""Compile a recipe into a build directory: the contract the runtime executes.

`compile_recipe` runs the phases in order (validate, prepare the data, estimate, emit) and holds
the result in memory; `write_build` swaps it into place. Everything written is deterministic
(sorted keys, no timestamps, hostnames or absolute paths), so recompiling an unchanged recipe
gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from compiler.data.prepare import PreparedData, prepare_dataset
from compiler.data.tokenizer import recipe_encoder
from compiler.diagnostics import Diagnostic, RecipeError
from compiler.emission.launch import ds_config_files, render_launch, render_slurm
from compiler.emission.manifest import listed_files, manifest
from compiler.emission.packing import packs, training_items
from compiler.emission.plan import build_plan
from compiler.emission.runtime_config import planned_steps, runtime_config, stages_without_steps, steps_per_epoch
from compiler.estimation.catalog import ModelFacts
from compiler.estimation.params import Architecture, architecture, parameters
from compiler.estimation.stages import StageEstimate, estimate_stage, trainable_parameters
from compiler.loading.loader import LoadedRecipe, display_path
from compiler.loading.overrides import Override
from compiler.loading.recipe import ScratchModel, Stage, eval_dataset, stage_adapter, training, used_datasets
from compiler.rules.context import Context, model_facts
from compiler.rules.meta_rules import check_with_meta_model
from compiler.rules.validate import validate
from compiler.views.plan_md import render_markdown
from runtime.contract.assets import load_catalog
from runtime.contract.config import RuntimeConfig
from runtime.contract.files import (
    RunLockBusy,
    folder_lock,
    interrupted_swaps,
    replace_files,
    roll_back_interrupted,
    run_lock,
)
from runtime.contract.layout import (
    COMPILE_SWAP,
    LAUNCH_SH,
    MANIFEST_FILE,
    PLAN_JSON,
    PLAN_MD,
    RUNTIME_CONFIG_FILE,
    SLURM_JOB,
    TOKENIZER_FILE,
)


@dataclass(frozen=True)
class Build:
    """A compiled recipe held in memory: relative path -> file content."""

    name: str
    files: dict[str, bytes]
    plan: dict
    warnings: tuple[Diagnostic, ...]
    estimates: tuple[StageEstimate, ...] = ()  # the plan's figures in bytes, before rounding


def compile_recipe(path: Path, overrides: Sequence[Override] = ()) -> Build:
    """Validate, read and measure the data, choose budgets, estimate, and render the build files."""
    loaded, warnings = validate(path, overrides)
    recipe = loaded.recipe
    assets = load_catalog()
    facts, _ = model_facts(Context(loaded, {n: a.filename for n, a in assets.items()}))
    assert facts is not None  # validate reported an unknown architecture already
    meta_count, meta_check = check_with_meta_model(loaded, facts)
    encoder = recipe_encoder(loaded, assets)
    cap = _context_cap(recipe.model, facts)
    eval_data = eval_dataset(recipe)
    prepared: dict[str, PreparedData] = {}
    for name in used_datasets(recipe):
        label_field = recipe.eval.label_field if recipe.eval and name == eval_data else None
        prepared[name] = prepare_dataset(loaded, name, assets, encoder, cap, label_field)
    warnings = list(warnings) + [w for p in prepared.values() for w in p.warnings]
    no_steps = stages_without_steps(loaded, prepared)
    if no_steps:
        raise RecipeError(no_steps)

    n_positions = _n_positions(recipe.model, facts, prepared)
    vocab_size = encoder.vocab_size if isinstance(recipe.model, ScratchModel) else facts.vocab_size
    arch = architecture(facts, vocab_size=vocab_size, n_positions=n_positions, meta=meta_count)
    config = runtime_config(loaded, facts, arch, encoder, prepared, n_positions, eval_data)
    estimates = [_estimate(loaded, arch, facts.family, stage, prepared[spec.data], config)
                 for stage, spec in zip(recipe.stages, config.stages)]

    files: dict[str, bytes] = {RUNTIME_CONFIG_FILE: config.to_json().encode()}
    if encoder is not None:
        files[TOKENIZER_FILE] = encoder.json.encode()
    for name, data in prepared.items():
        files[config.data[name].train] = data.train_jsonl
        files[config.data[name].heldout] = data.heldout_jsonl
    plan = build_plan(
        loaded=loaded,
        config=config,
        facts=facts,
        arch=arch,
        total_parameters=parameters(arch),
        meta_check=meta_check,
        prepared=prepared,
        estimates=estimates,
        encoder_source=encoder.source if encoder else None,
        overrides=overrides,
        warnings=warnings,
    )
    files[PLAN_JSON] = (json.dumps(plan, indent=2, sort_keys=True) + "\n").encode()
    files[PLAN_MD] = render_markdown(plan).encode()
    recipe_file = Path(display_path(loaded.path)).as_posix()
    files[LAUNCH_SH] = render_launch(config, recipe, recipe_file).encode()
    files[SLURM_JOB] = render_slurm(config, recipe, recipe_file).encode()
    files.update(ds_config_files(config))
    files[MANIFEST_FILE] = manifest(loaded, files, prepared).encode()
    return Build(name=recipe.name, files=files, plan=plan, warnings=tuple(warnings), estimates=tuple(estimates))


def write_build(build: Build, out_dir: Path) -> list[str]:
    """Write the build's files into `out_dir` as one change, and remove artifacts a previous
    compile wrote that this one no longer produces. Run outputs (checkpoints, stages, model,
    metrics, eval) and anything else in the folder are left where they are.

    A compile killed at any moment leaves the previous build whole (a half-done swap is rolled
    back by the next compile, `recipe run` or `recipe eval`), or, with no previous build, a folder
    that `recipe run` recognises as incomplete (`incomplete_build`). Refused while a run trains
    the folder. Returns notes on what an earlier, interrupted compile had left."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(out_dir), _no_run_training(out_dir):
        leftovers = interrupted_swaps(out_dir, COMPILE_SWAP)
        restored = roll_back_interrupted(out_dir, COMPILE_SWAP, clean=True)
        stale = listed_files(out_dir) - set(build.files)
        files: dict[str, bytes | None] = {**build.files, **dict.fromkeys(stale)}
        replace_files(out_dir, COMPILE_SWAP, files, frozenset(r for r in build.files if r.endswith(".sh")))
    if restored:
        return [f"{out_dir} was left half-replaced by an interrupted `recipe compile`; restored the build it "
                "replaced, then wrote this one"]
    if leftovers:
        return [f"removed the leftovers of an interrupted `recipe compile` from {out_dir}"]
    return []


@contextlib.contextmanager
def _no_run_training(out_dir: Path):
    """Refuse to change a build while a run trains it (its runtime.json would change underneath)."""
    try:
        with run_lock(out_dir, create=False):
            yield
    except RunLockBusy:
        raise RecipeError.single(
            f"a run is training {out_dir} right now; wait for it to finish, or compile into another "
            "directory with --out") from None


def incomplete_build(out_dir: Path) -> bool:
    """True for a folder a compile began but never finished (with no earlier build to fall back on)."""
    return not (out_dir / RUNTIME_CONFIG_FILE).is_file() and bool(interrupted_swaps(out_dir, COMPILE_SWAP))


def _context_cap(model, facts: ModelFacts) -> int | None:
    """The model's context length when it is fixed: no data set's budget may exceed it."""
    if isinstance(model, ScratchModel):
        return model.n_positions if isinstance(model.n_positions, int) else None
    return facts.max_positions


def _n_positions(model, facts: ModelFacts, prepared: dict[str, PreparedData]) -> int:
    """The model's context length: as set, the checkpoint's, or (scratch, "auto") the largest budget."""
    if isinstance(model, ScratchModel):
        if isinstance(model.n_positions, int):
            return model.n_positions
        return max(p.max_total_tokens for p in prepared.values())
    return facts.max_positions


def _estimate(loaded: LoadedRecipe, arch: Architecture, family: str, stage: Stage, data: PreparedData,
              config: RuntimeConfig) -> StageEstimate:
    r = loaded.recipe
    t = training(r, stage)
    world = r.hardware.nodes * r.hardware.nproc_per_node
    n_train = training_items(packs(t, stage), data)  # rows, or the packs they make
    model = config.model.config
    dropout = any(float(model.get(k, 0) or 0) > 0 for k in ("resid_pdrop", "attention_dropout", "hidden_dropout"))
    return estimate_stage(
        r, arch, family, stage, trainable=trainable_parameters(arch, stage_adapter(r, stage)), n_train=n_train,
        tokens_per_epoch=data.tokens_per_epoch, supervised_per_epoch=data.supervised_per_epoch,
        max_total_tokens=data.max_total_tokens, max_completion_tokens=data.max_total_tokens if packs(t, stage) else data.max_completion_tokens,  # a full packed row
        mean_seq_len=data.mean_seq_len, steps=planned_steps(t, n_train, world, stage),
        steps_per_epoch=steps_per_epoch(t, n_train, world, stage), dropout=dropout,
    )
