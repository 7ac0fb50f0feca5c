"""What a stage leaves behind, and the weights the next one starts from.

  stages/<stage>/model/   each finished stage's model or adapter, with tokenizer and template
  stages/<stage>/done.json  its report, for the runtime.json it was trained from
  model/                  the last stage's output
  model-merged/           LoRA merged into the base weights, when the adapter asks for `merge`

Each folder is written beside its place and renamed into it (`write_tree`), so a reader finds the
whole previous output or the whole new one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedTokenizerFast

from runtime.contract.artifacts import StageDone, StageReport, dumps, read_stage_done
from runtime.contract.config import IncompatibleBuildError, RuntimeConfig, StageSpec
from runtime.contract.files import write_atomic
from runtime.contract.layout import MERGED_DIR, MODEL_DIR, STAGE_DONE_FILE, TEMPLATE_FILE, stage_dir
from runtime.core.checkpoint import CheckpointError
from runtime.core.model import hold_in_precision, is_quantized, is_scalar, load_model, scalar_model
from runtime.core.run import Run


def write_tree(folder: Path, write: Callable[[Path], None]) -> None:
    """Write a folder through `write(tmp)` and rename it into place, replacing any earlier one whole."""
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    previous = folder.parent / f".{folder.name}.previous-{os.getpid()}"
    if folder.exists():
        os.replace(folder, previous)
    os.replace(tmp, folder)
    shutil.rmtree(previous, ignore_errors=True)


def finished_report(run: Run, stage: StageSpec) -> StageReport | None:
    """The report of a stage this build already finished (same runtime.json), else None."""
    try:
        done = read_stage_done(run.build_dir / stage_dir(stage.name) / STAGE_DONE_FILE)
    except IncompatibleBuildError:  # absent, cut short, or from another runtime: train it again
        return None
    return done.report if done.config_sha256 == run.config_sha256 else None


def save_model(run: Run, stage: StageSpec, model: torch.nn.Module, folder: Path) -> None:
    """HF model or peft adapter, tokenizer, and the exact template: loadable without this project."""
    config = run.config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if config.tokenizer.file is not None:
            tokenizer = PreTrainedTokenizerFast(
                tokenizer_file=str(run.build_dir / config.tokenizer.file), eos_token=config.tokenizer.eos_token,
                pad_token=config.tokenizer.pad_token, model_max_length=config.model.n_positions,
            )
            template = config.data[stage.data].template
            if template.chat is not None:
                tokenizer.chat_template = template.chat
            tokenizer.save_pretrained(tmp)
        data = config.data[stage.data]
        template = {**data.template.model_dump(mode="json"), "max_total_tokens": data.max_total_tokens,
                    "engine": "jinja2-sandboxed-strict"}
        (tmp / TEMPLATE_FILE).write_text(json.dumps(template, indent=2, sort_keys=True) + "\n")

    write_tree(folder, write)


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """LoRA folded into the base weights (a plain transformers model); other models unchanged."""
    if hasattr(model, "merge_and_unload") and getattr(model, "active_peft_config", None) is not None \
            and not model.active_peft_config.is_prompt_learning:
        return model.merge_and_unload()
    return model


def merged_export(run: Run, stage: StageSpec, model: torch.nn.Module, adapter_folder: Path) -> torch.nn.Module:
    """The LoRA stage's model with its adapter merged, for `model-merged/`.

    Over a quantized base the adapter is merged into the dequantized base, the weights it was
    trained against, held in the working precision (QLoRA's usual export): merging into the
    4-bit weights would round the sum back to 4 bits."""
    if not is_quantized(model):
        return merged(copy.deepcopy(model))
    from peft import PeftModel

    base = starting_model(run.config, run.build_dir, stage).dequantize()
    return PeftModel.from_pretrained(base, adapter_folder).merge_and_unload()


def finish_stage(run: Run, stage: StageSpec, model: torch.nn.Module, report: StageReport, last: bool) -> None:
    """Save a trained stage's output (and the build's model/ after the last stage), then mark it
    done; rank 0 writes, the other ranks return at once."""
    if not run.d.is_main:
        return
    folder = run.build_dir / stage_dir(stage.name)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(run, stage, model, folder / MODEL_DIR)
    if last:
        save_model(run, stage, model, run.build_dir / MODEL_DIR)
        if stage.adapter.kind == "lora" and stage.adapter.params.get("merge"):
            save_model(run, stage, merged_export(run, stage, model, folder / MODEL_DIR), run.build_dir / MERGED_DIR)
    done = StageDone(config_sha256=run.config_sha256, report=report)
    write_atomic(folder / STAGE_DONE_FILE, dumps(done).encode())


def load_stage_output(config: RuntimeConfig, build_dir: Path, stage_name: str) -> torch.nn.Module:
    """A finished stage's model as the next stage starts from it: adapters merged into their base.
    A reward stage's output is a sequence-classification model (the reward head included)."""
    stage = next(s for s in config.stages if s.name == stage_name)
    folder = build_dir / stage_dir(stage.name) / MODEL_DIR
    if stage.adapter.kind in ("lora", "prefix"):
        from peft import PeftModel

        base = starting_model(config, build_dir, stage)
        if stage.kind == "reward" and not is_scalar(base):
            base = scalar_model(base, config.seed)  # its head is replaced by the saved one
        return merged(PeftModel.from_pretrained(base, folder))
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if stage.kind == "reward" else AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=torch.float32, attn_implementation=config.hardware.attention)


def starting_model(config: RuntimeConfig, build_dir: Path, stage: StageSpec) -> torch.nn.Module:
    """The weights a stage starts from: the base model, or an earlier stage's output."""
    if stage.start == "base":
        torch.manual_seed(config.seed)  # scratch weights are the same on every rank and every attempt
        return load_model(config.model, config.hardware, frozen=stage.adapter.kind != "full")
    return hold_in_precision(load_stage_output(config, build_dir, stage.start), config.hardware,
                             trains_whole=stage.adapter.kind == "full")


def load_trainable(model: torch.nn.Module, tensors: dict, folder: Path) -> None:
    """Copy the trainable parameters saved in `folder` (a checkpoint) into `model`."""
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
    unknown = sorted(set(tensors) - set(params))
    if missing or unknown:
        raise CheckpointError(
            f"{folder} does not match this model (missing {missing[:3]}, unexpected {unknown[:3]}); "
            "it was written by a different build"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
