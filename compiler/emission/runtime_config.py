"""The runtime config (`runtime.json`): the recipe resolved into what the runtime executes.

Built from the loaded recipe, the architecture and the prepared data; the runtime reads only this
(and the files it names), never the recipe. Steps are counted by the runtime's own formula
(`runtime.contract.steps`), so the plan and the run agree.
"""

from __future__ import annotations

import math
from pathlib import Path

from compiler.data.prepare import PreparedData
from compiler.data.tokenizer import Encoder
from compiler.diagnostics import Diagnostic
from compiler.emission.packing import packs, training_items
from compiler.estimation.catalog import ModelFacts
from compiler.estimation.params import Architecture, all_linear_names
from compiler.estimation.vision import VISION_MODULES
from compiler.loading.loader import LoadedRecipe, display_path
from compiler.loading.recipe import (
    GrpoStage,
    PpoStage,
    ScratchModel,
    Stage,
    TrainSection,
    eval_stage,
    stage_adapter,
    stage_dataset,
    training,
)
from compiler.rules.context import resolve_data_path
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
from runtime.contract.layout import HELDOUT_SPLIT, TOKENIZER_FILE, TRAIN_SPLIT, data_file
from runtime.contract.steps import micro_batches, rollout_steps_per_epoch
from runtime.contract.steps import steps_per_epoch as contract_steps_per_epoch

# Generation length for an unmeasured data set's samples when the recipe does not set one.
DEFAULT_UNMEASURED_NEW_TOKENS = 256
_STAGE_PARAMS_EXCLUDE = {"name", "kind", "data", "start", "adapter"}


def runtime_config(loaded: LoadedRecipe, facts: ModelFacts, arch: Architecture, encoder: Encoder | None,
                   prepared: dict[str, PreparedData], n_positions: int, eval_data: str) -> RuntimeConfig:
    """The resolved config; `eval_data` names the data set [eval] reads."""
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
            train=data_file(name, TRAIN_SPLIT),
            heldout=data_file(name, HELDOUT_SPLIT),
            n_train=p.n_train,
            n_heldout=p.n_heldout,
            tokenized=p.measured,
            max_total_tokens=p.max_total_tokens,
        )
        for name, p in prepared.items()
    }
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
        stages=tuple(_stage_spec(loaded, s, training_items(packs(training(r, s), s), prepared[stage_dataset(r, s)]), arch)
                     for s in r.stages),
        eval=_eval_spec(loaded, prepared, eval_data),
        hardware=HardwareSpec(device=hw.device, gpu=hw.gpu, nproc_per_node=hw.nproc_per_node, nodes=hw.nodes,
                              precision=hw.precision, zero_stage=hw.zero_stage, offload_optimizer=hw.offload_optimizer,
                              offload_params=hw.offload_params, gradient_checkpointing=hw.gradient_checkpointing,
                              attention=hw.attention, host_memory=hw.host_memory),
    )


def planned_steps(t: TrainSection, n_train: int, world: int, stage: Stage | None = None) -> int:
    """Steps of a stage, by the formula the runtime counts with (runtime.contract.steps): an
    optimizer step over micro-batch x accumulation examples on each process, for PPO one rollout
    batch (rollout_batch_size prompts per process)."""
    if t.max_steps is not None:
        return t.max_steps
    return t.epochs * steps_per_epoch(t, n_train, world, stage)


def steps_per_epoch(t: TrainSection, n_train: int, world: int, stage: Stage | None = None) -> int:
    if isinstance(stage, (PpoStage, GrpoStage)):
        return rollout_steps_per_epoch(n_train, stage.rollout_batch_size, world)
    return contract_steps_per_epoch(n_train, t.micro_batch_size, t.grad_accum, world)


def stages_without_steps(loaded: LoadedRecipe, prepared: dict[str, PreparedData]) -> list[Diagnostic]:
    """A diagnostic for each stage whose epoch would come out at 0 optimizer steps: its training
    rows make fewer micro-batches than there are processes (or there are none)."""
    r = loaded.recipe
    world = r.hardware.nodes * r.hardware.nproc_per_node
    out = []
    for i, stage in enumerate(r.stages):
        t = training(r, stage)
        rows = training_items(packs(t, stage), prepared[stage_dataset(r, stage)])
        if steps_per_epoch(t, rows, world, stage) > 0:
            continue
        name = stage_dataset(r, stage)
        if isinstance(stage, (PpoStage, GrpoStage)) or rows == 0:
            out.append(Diagnostic(
                "error", f'stage "{stage.name}" has no training rows: data set "{name}" kept none for training',
                help="add rows, or lower the data set's split.heldout_fraction", **loaded.where(("stages", i))))
            continue
        batches = micro_batches(rows, t.micro_batch_size)
        fits = rows // world
        out.append(Diagnostic(
            "error", f'stage "{stage.name}" would take 0 steps per epoch: {rows} training rows of data set "{name}" '
            f"make {batches} micro-batch{'es' * (batches != 1)} of {t.micro_batch_size}, fewer than the {world} "
            "processes that each need one",
            help=(f"set micro_batch_size = {fits} or less" if fits else "add training rows")
            + f", or train on fewer processes (hardware.nproc_per_node x hardware.nodes = {world})",
            **loaded.where(_micro_batch_key(loaded, i))))
    return out


def _micro_batch_key(loaded: LoadedRecipe, index: int) -> tuple[str | int, ...]:
    """Where the stage's micro-batch size was set: on the stage, in [train], or (default) the stage."""
    r = loaded.recipe
    if r.stages[index].micro_batch_size is not None:
        return ("stages", index, "micro_batch_size")
    if "micro_batch_size" in r.train.model_fields_set:
        return ("train", "micro_batch_size")
    return ("stages", index)


def _adapter_spec(adapter, arch: Architecture) -> AdapterSpec:
    params = adapter.model_dump(mode="json", exclude={"kind"})
    if params.get("targets") == "all-linear" and all_linear_names(arch) is not None:
        # A mixture of experts: peft's "all-linear" would also adapt the router and the routed
        # experts' 3-D tensors; the resolved list adapts the model's linear layers only.
        params["targets"] = list(all_linear_names(arch))
    if adapter.kind == "lora" and not params["expert_targets"]:
        del params["expert_targets"]  # asked for only in a mixture of experts: other builds stay as they were
    if adapter.kind in ("lora", "full") and arch.vision:
        # The plan trains the language model only. peft matches target names anywhere, so the
        # vision tower's q/k/v_proj (and, for "all-linear", its fc1/fc2) would be adapted too; a
        # full fine-tune would count the tower as trainable though text gives it no gradient.
        params["exclude_modules"] = VISION_MODULES
    return AdapterSpec(kind=adapter.kind, params=params)


def _stage_spec(loaded: LoadedRecipe, stage: Stage, n_train: int, arch: Architecture) -> StageSpec:
    r = loaded.recipe
    t = training(r, stage)
    steps = planned_steps(t, n_train, r.hardware.nodes * r.hardware.nproc_per_node, stage)
    warmup = t.warmup_steps if t.warmup_ratio is None else math.ceil(t.warmup_ratio * steps)
    own = {k: v for k, v in stage.model_dump(mode="json").items()
           if k not in _STAGE_PARAMS_EXCLUDE and k not in type(t).model_fields}
    if isinstance(stage, GrpoStage):
        own["rewards"] = [_reward_params(loaded, stage, reward) for reward in own["rewards"]]
    return StageSpec(
        name=stage.name,
        kind=stage.kind,
        data=stage_dataset(r, stage),
        start=stage.start,
        adapter=_adapter_spec(stage_adapter(r, stage), arch),
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
        momentum=t.momentum,
        log_every_steps=t.log_every_steps,
        eval_every_steps=t.eval_every_steps,
        save_best=t.save_best,
        early_stopping_patience=t.early_stopping_patience,
        save_every_steps=t.save_every_steps,
        keep_checkpoints=t.keep_checkpoints,
        length_grouping=t.length_grouping,
        packing=t.packing,
        cross_entropy=t.cross_entropy,
        compile=t.compile,
        report_to=t.report_to,
        params=own,
    )


def _reward_params(loaded: LoadedRecipe, stage: GrpoStage, reward: dict) -> dict:
    """A reward table as the runtime reads it: named, and a label set's labels resolved from the
    derived field when the recipe does not list them."""
    out = {**reward, "name": reward["name"] or reward["kind"]}
    if reward["kind"] == "label_set" and reward["labels"] is None:
        derive = next(d for d in loaded.recipe.data[stage_dataset(loaded.recipe, stage)].derive
                      if d.name == reward["field"])  # the rules refuse a label_set without labels otherwise
        out["labels"] = list(derive.labels)
    return out


def _eval_spec(loaded: LoadedRecipe, prepared: dict[str, PreparedData], eval_data: str) -> EvalSpec | None:
    ev = loaded.recipe.eval
    if ev is None:
        return None
    p = prepared[eval_data]
    if ev.max_new_tokens != "auto":
        max_new = ev.max_new_tokens
    elif p.measured:
        max_new = max(1, p.max_completion_tokens)
    else:
        max_new = min(DEFAULT_UNMEASURED_NEW_TOKENS, p.max_total_tokens)
    return EvalSpec(kind=ev.kind, data=eval_data, stage=eval_stage(loaded.recipe).name, label_field=ev.label_field,
                    labels=_eval_labels(loaded, eval_data, p), extract=ev.extract, max_new_tokens=max_new,
                    batch_size=ev.batch_size, samples=ev.samples, tasks=ev.tasks, num_fewshot=ev.num_fewshot,
                    limit=ev.limit, task_dirs=tuple(Path(display_path(resolve_data_path(loaded.path, folder))).as_posix()
                                                    for folder in ev.task_dirs))


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
