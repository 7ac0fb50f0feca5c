"""Compile a recipe into a build directory: the contract the runtime executes.

Everything written here is deterministic (sorted keys, no timestamps, hostnames or absolute
paths), so recompiling an unchanged recipe gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from compiler import plan as plan_module
from compiler.assets import AssetError, AssetSpec, load_catalog
from compiler.catalog import ModelFacts
from compiler.checks import Context, model_facts, resolve_data_path, tokenizer_format
from compiler.diagnostics import Diagnostic, RecipeError
from compiler.launch import ds_config_files, render_launch, render_slurm
from compiler.loader import LoadedRecipe, display_path
from compiler.overrides import Override
from compiler.params import (
    Architecture,
    architecture,
    freeze_parameters,
    lora_parameters,
    parameters,
    prefix_parameters,
)
from compiler.prepare import PreparedData, prepare_dataset
from compiler.recipe import (
    FreezeAdapter,
    LoraAdapter,
    PpoStage,
    PrefixAdapter,
    PretrainedModel,
    ScratchModel,
    Stage,
    stage_adapter,
    stage_dataset,
    training,
)
from compiler.stage_estimate import StageEstimate, estimate_stage
from compiler.tokenizer import Encoder, folder_encoder, gguf_encoder, tiktoken_encoder
from compiler.validate import validate
from runtime.contract.files import (
    RunLockBusy,
    folder_lock,
    interrupted_swaps,
    replace_files,
    roll_back_interrupted,
    run_lock,
)
from runtime.contract.layout import COMPILE_SWAP
from runtime.contract.steps import rollout_steps_per_epoch
from runtime.contract.steps import steps_per_epoch as contract_steps_per_epoch
from runtime.contract.config import (
    SCHEMA_VERSION,
    AdapterSpec,
    DataSpec,
    EvalSpec,
    HardwareSpec,
    ModelSpec,
    RuntimeConfig,
    StageSpec,
    TokenizerSpec,
    WeightsSpec,
)

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer/tokenizer.json"
# Generation length for an unmeasured data set's samples when the recipe does not set one.
DEFAULT_UNMEASURED_NEW_TOKENS = 256


@dataclass(frozen=True)
class Build:
    """A compiled recipe held in memory: relative path -> file content."""

    name: str
    files: dict[str, bytes]
    plan: dict
    warnings: tuple[Diagnostic, ...]


def compile_recipe(path: Path, overrides: Sequence[Override] = ()) -> Build:
    """Validate, read and measure the data, choose budgets, estimate, and render the build files."""
    loaded, warnings = validate(path, overrides)
    recipe = loaded.recipe
    assets = load_catalog()
    facts, _ = model_facts(Context(loaded, {n: a.filename for n, a in assets.items()}))
    assert facts is not None  # validate reported an unknown architecture already
    encoder = _load_encoder(loaded, assets)
    cap = _context_cap(recipe.model, facts)
    eval_data = _eval_dataset(loaded)
    prepared: dict[str, PreparedData] = {}
    for name in _used_datasets(loaded):
        label_field = recipe.eval.label_field if recipe.eval and name == eval_data else None
        prepared[name] = prepare_dataset(loaded, name, assets, encoder, cap, label_field)
    warnings = list(warnings) + [w for p in prepared.values() for w in p.warnings]

    n_positions = _n_positions(recipe.model, facts, prepared)
    vocab_size = encoder.vocab_size if isinstance(recipe.model, ScratchModel) else facts.vocab_size
    arch = architecture(facts, vocab_size=vocab_size, n_positions=n_positions)
    config = _runtime_config(loaded, facts, arch, encoder, prepared, n_positions, eval_data)
    estimates = [_estimate(loaded, arch, facts.family, stage, prepared[spec.data], config)
                 for stage, spec in zip(recipe.stages, config.stages)]

    files: dict[str, bytes] = {"runtime.json": config.to_json().encode()}
    if encoder is not None:
        files[TOKENIZER_FILE] = encoder.json.encode()
    for name, data in prepared.items():
        files[config.data[name].train] = data.train_jsonl
        files[config.data[name].heldout] = data.heldout_jsonl
    plan = plan_module.build_plan(
        loaded=loaded,
        config=config,
        facts=facts,
        arch=arch,
        total_parameters=parameters(arch),
        prepared=prepared,
        estimates=estimates,
        encoder_source=encoder.source if encoder else None,
        overrides=overrides,
        warnings=warnings,
    )
    files["plan.json"] = (json.dumps(plan, indent=2, sort_keys=True) + "\n").encode()
    files["plan.md"] = plan_module.render_markdown(plan).encode()
    recipe_file = Path(display_path(loaded.path)).as_posix()
    files["launch.sh"] = render_launch(config, recipe, recipe_file).encode()
    files["job.slurm"] = render_slurm(config, recipe, recipe_file).encode()
    files.update(ds_config_files(config))
    files[MANIFEST_FILE] = _manifest(loaded, files, prepared).encode()
    return Build(name=recipe.name, files=files, plan=plan, warnings=tuple(warnings))


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
        stale = _previous_artifacts(out_dir) - set(build.files)
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
    return not (out_dir / "runtime.json").is_file() and bool(interrupted_swaps(out_dir, COMPILE_SWAP))


def _previous_artifacts(out_dir: Path) -> set[str]:
    manifest = out_dir / MANIFEST_FILE
    try:
        files = set(json.loads(manifest.read_text())["files"]) | {MANIFEST_FILE}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    # Only paths inside the folder: an edited manifest must not make a compile delete anything else.
    return {rel for rel in files if isinstance(rel, str) and rel and not Path(rel).is_absolute()
            and ".." not in Path(rel).parts}


# ---------------------------------------------------------------------------------------------
# inputs


def _load_encoder(loaded: LoadedRecipe, assets: dict[str, AssetSpec]) -> Encoder | None:
    """The tokenizer to measure with, or None when it is only on the hub."""
    r = loaded.recipe
    tok = r.tokenizer
    try:
        if tok is not None and tok.asset is not None:
            spec = assets[tok.asset]
            if tokenizer_format(tok, {n: a.filename for n, a in assets.items()}) == "tiktoken":
                return tiktoken_encoder(spec, dict(tok.special_tokens), tok.eos_token)
            return gguf_encoder(spec)
        if tok is not None and tok.path is not None:
            return folder_encoder(resolve_data_path(loaded.path, tok.path), tok.path)
        if tok is not None and tok.hub is not None:
            return None
        model = r.model
        if isinstance(model, PretrainedModel):
            if model.asset is not None and assets[model.asset].filename.endswith(".gguf"):
                return gguf_encoder(assets[model.asset])
            if model.path is not None:
                folder = resolve_data_path(loaded.path, model.path)
                if (folder / "tokenizer.json").is_file():
                    return folder_encoder(folder, model.path)
        return None
    except AssetError as exc:
        raise RecipeError.single(str(exc), **loaded.where(("tokenizer",) if tok else ("model",))) from None


def _context_cap(model, facts: ModelFacts) -> int | None:
    if isinstance(model, ScratchModel):
        return model.n_positions if isinstance(model.n_positions, int) else None
    return facts.max_positions


def _used_datasets(loaded: LoadedRecipe) -> list[str]:
    r = loaded.recipe
    names = [stage_dataset(r, s) for s in r.stages]
    names += [s.ptx_data for s in r.stages if isinstance(s, PpoStage) and s.ptx_data]
    if r.eval is not None:
        names.append(_eval_dataset(loaded))
    return list(dict.fromkeys(names))


def _eval_dataset(loaded: LoadedRecipe) -> str:
    r = loaded.recipe
    if r.eval is not None and r.eval.data is not None:
        return r.eval.data
    stage = _eval_stage(loaded)
    return stage_dataset(r, stage)


def _eval_stage(loaded: LoadedRecipe) -> Stage:
    r = loaded.recipe
    name = r.eval.stage if r.eval and r.eval.stage else r.stages[-1].name
    return next(s for s in r.stages if s.name == name)


def _n_positions(model, facts: ModelFacts, prepared: dict[str, PreparedData]) -> int:
    if isinstance(model, ScratchModel):
        if isinstance(model.n_positions, int):
            return model.n_positions
        return max(p.max_total_tokens for p in prepared.values())
    return facts.max_positions


# ---------------------------------------------------------------------------------------------
# the runtime contract


def _adapter_spec(adapter) -> AdapterSpec:
    params = adapter.model_dump(mode="json", exclude={"kind"})
    return AdapterSpec(kind=adapter.kind, params=params)


_STAGE_PARAMS_EXCLUDE = {"name", "kind", "data", "start", "adapter"}


def _stage_spec(loaded: LoadedRecipe, stage: Stage, n_train: int) -> StageSpec:
    r = loaded.recipe
    t = training(r, stage)
    steps = planned_steps(t, n_train, r.hardware.nodes * r.hardware.nproc_per_node, stage)
    warmup = t.warmup_steps if t.warmup_ratio is None else math.ceil(t.warmup_ratio * steps)
    own = {k: v for k, v in stage.model_dump(mode="json").items()
           if k not in _STAGE_PARAMS_EXCLUDE and k not in type(t).model_fields}
    return StageSpec(
        name=stage.name,
        kind=stage.kind,
        data=stage_dataset(r, stage),
        start=stage.start,
        adapter=_adapter_spec(stage_adapter(r, stage)),
        epochs=t.epochs,
        max_steps=t.max_steps,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_schedule=t.lr_schedule,
        warmup_steps=warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optimizer=t.optimizer,
        adam_betas=t.adam_betas,
        adam_eps=t.adam_eps,
        log_every_steps=t.log_every_steps,
        eval_every_steps=t.eval_every_steps,
        save_every_steps=t.save_every_steps,
        keep_checkpoints=t.keep_checkpoints,
        length_grouping=t.length_grouping,
        packing=t.packing,
        params=own,
    )


def _runtime_config(loaded, facts, arch: Architecture, encoder, prepared, n_positions, eval_data) -> RuntimeConfig:
    r = loaded.recipe
    model = r.model
    eos = (r.tokenizer.eos_token if r.tokenizer and r.tokenizer.eos_token else None) or (encoder.eos_token if encoder else None)
    pad = (r.tokenizer.pad_token if r.tokenizer and r.tokenizer.pad_token else None) or (encoder.pad_token if encoder else None) or eos
    eos_id = encoder.token_id(eos) if encoder and eos else None
    pad_id = encoder.token_id(pad) if encoder and pad else None
    if isinstance(model, ScratchModel):
        config = {"model_type": "gpt2", "n_embd": model.n_embd, "n_layer": model.n_layer, "n_head": model.n_head,
                  "n_positions": n_positions, "vocab_size": arch.vocab_size, "resid_pdrop": model.dropout,
                  "embd_pdrop": model.dropout, "attn_pdrop": model.dropout}
        weights = None
        trust, quant = False, "none"
    else:
        config = dict(facts.config)
        weights = WeightsSpec(hub=model.hub, revision=model.revision,
                              path=Path(display_path(resolve_data_path(loaded.path, model.path))).as_posix()
                              if model.path else None,
                              asset=model.asset)
        trust, quant = model.trust_remote_code, model.quantization
    data = {
        name: DataSpec(
            format=p.format,
            template=p.template,
            train=f"data/{name}/train.jsonl",
            heldout=f"data/{name}/heldout.jsonl",
            n_train=p.train_jsonl.count(b"\n"),
            n_heldout=p.heldout_jsonl.count(b"\n"),
            tokenized=p.measured,
            max_total_tokens=p.max_total_tokens,
        )
        for name, p in prepared.items()
    }
    eval_spec = None
    if r.eval is not None:
        ev = r.eval
        p = prepared[eval_data]
        labels = _eval_labels(loaded, eval_data, p)
        if ev.max_new_tokens != "auto":
            max_new = ev.max_new_tokens
        elif p.measured:
            max_new = max(1, p.max_completion_tokens)
        else:
            max_new = min(DEFAULT_UNMEASURED_NEW_TOKENS, p.max_total_tokens)
        eval_spec = EvalSpec(kind=ev.kind, data=eval_data, stage=_eval_stage(loaded).name, label_field=ev.label_field,
                             labels=labels, extract=ev.extract, max_new_tokens=max_new, batch_size=ev.batch_size,
                             samples=ev.samples)
    hw = r.hardware
    return RuntimeConfig(
        schema_version=SCHEMA_VERSION,
        name=r.name,
        seed=r.seed,
        model=ModelSpec(init=model.init, family=facts.family, config=config, weights=weights, trust_remote_code=trust,
                        quantization=quant, vocab_size=arch.vocab_size, n_positions=n_positions,
                        eos_token_id=eos_id, pad_token_id=pad_id),
        tokenizer=TokenizerSpec(file=TOKENIZER_FILE if encoder else None,
                                hub=None if encoder else (r.tokenizer.hub if r.tokenizer and r.tokenizer.hub else getattr(model, "hub", None)),
                                eos_token=eos, pad_token=pad),
        data=data,
        stages=tuple(_stage_spec(loaded, s, data[stage_dataset(r, s)].n_train) for s in r.stages),
        eval=eval_spec,
        hardware=HardwareSpec(device=hw.device, gpu=hw.gpu, nproc_per_node=hw.nproc_per_node, nodes=hw.nodes,
                              precision=hw.precision, zero_stage=hw.zero_stage, offload_optimizer=hw.offload_optimizer,
                              offload_params=hw.offload_params, gradient_checkpointing=hw.gradient_checkpointing,
                              attention=hw.attention),
    )


def _eval_labels(loaded: LoadedRecipe, name: str, p: PreparedData) -> tuple[str, ...]:
    ev = loaded.recipe.eval
    if ev is None or ev.label_field is None:
        return ()
    for derive in loaded.recipe.data[name].derive:
        if derive.name == ev.label_field:
            return tuple(derive.labels)
    if p.label_counts is None:
        return ()
    return tuple(sorted(set(p.label_counts["train"]) | set(p.label_counts["heldout"])))


# ---------------------------------------------------------------------------------------------
# estimates


def planned_steps(t, n_train: int, world: int, stage: Stage | None = None) -> int:
    """Steps of a stage, by the formula the runtime counts with (runtime.contract.steps): an
    optimizer step over micro-batch x accumulation examples on each process, for PPO one rollout
    batch (rollout_batch_size prompts per process)."""
    if t.max_steps is not None:
        return t.max_steps
    return t.epochs * steps_per_epoch(t, n_train, world, stage)


def steps_per_epoch(t, n_train: int, world: int, stage: Stage | None = None) -> int:
    if isinstance(stage, PpoStage):
        return rollout_steps_per_epoch(n_train, stage.rollout_batch_size, world)
    return contract_steps_per_epoch(n_train, t.micro_batch_size, t.grad_accum, world)


def trainable_parameters(arch: Architecture, adapter) -> int:
    if isinstance(adapter, LoraAdapter):
        return lora_parameters(arch, adapter.rank, adapter.targets)
    if isinstance(adapter, PrefixAdapter):
        return prefix_parameters(arch, adapter.num_virtual_tokens, adapter.projection, adapter.projection_hidden_size)
    if isinstance(adapter, FreezeAdapter):
        return freeze_parameters(arch, adapter.trainable_layers, adapter.train_embeddings)
    return parameters(arch).total


def _estimate(loaded: LoadedRecipe, arch: Architecture, family: str, stage: Stage, data: PreparedData,
              config: RuntimeConfig) -> StageEstimate:
    r = loaded.recipe
    t = training(r, stage)
    world = r.hardware.nodes * r.hardware.nproc_per_node
    n_train = config.data[stage_dataset(r, stage)].n_train
    model = config.model.config
    dropout = any(float(model.get(k, 0) or 0) > 0 for k in ("resid_pdrop", "attention_dropout", "hidden_dropout"))
    return estimate_stage(
        r, arch, family, stage, trainable=trainable_parameters(arch, stage_adapter(r, stage)), n_train=n_train,
        tokens_per_epoch=data.tokens_per_epoch, supervised_per_epoch=data.supervised_per_epoch,
        max_total_tokens=data.max_total_tokens, max_completion_tokens=data.max_completion_tokens,
        mean_seq_len=data.mean_seq_len, steps=planned_steps(t, n_train, world, stage),
        steps_per_epoch=steps_per_epoch(t, n_train, world, stage), dropout=dropout,
    )


_VERSIONED = ("recipe", "torch", "transformers", "peft", "deepspeed", "datasets", "tokenizers")


def _versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on (read from metadata; nothing imported)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(loaded: LoadedRecipe, files: dict[str, bytes], prepared: dict[str, PreparedData]) -> str:
    data = {}
    for name, p in sorted(prepared.items()):
        data[name] = {
            "source": p.source_label,
            "files": {path.name: _sha256(path.read_bytes()) for path in p.files},
        }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "versions": _versions(),
        "recipe": {"file": Path(display_path(loaded.path)).as_posix(), "sha256": _sha256(loaded.text.encode())},
        "data": data,
        "files": {rel: _sha256(content) for rel, content in sorted(files.items())},
    }
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"

