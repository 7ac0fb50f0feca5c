"""Training stage (`sft`): reads the build directory, trains, and saves model, tokenizer and template.

Launched by the build's `launch.sh` through torchrun: `python -m runtime.train BUILD_DIR`.
Single process or several (DistributedDataParallel; gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast, get_scheduler

from runtime.config import IncompatibleBuildError, RuntimeConfig, StageSpec, load_runtime_config, unsupported
from runtime.data import Encoded, collate_for_training, length_grouped_batches, read_examples
from runtime.model import CompletionLoss, build_model

MODEL_DIR = "model"
TEMPLATE_FILE = "recipe_template.json"


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank)


def _device(config: RuntimeConfig, d: Dist) -> torch.device:
    if config.hardware.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError('the build targets hardware.device = "cuda" but no GPU is visible')
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def _autocast(config: RuntimeConfig, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.hardware.precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _optimizer(model: torch.nn.Module, stage: StageSpec) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (biases and layer norms are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": stage.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=stage.learning_rate, betas=stage.adam_betas)


def _epoch_batches(examples: list[Encoded], stage: StageSpec, seed: int, epoch: int, d: Dist) -> list[list[int]]:
    batches = length_grouped_batches(
        [len(e) for e in examples], stage.micro_batch_size, seed + epoch, group=stage.length_grouping
    )
    # Every rank must take the same number of steps; the last few batches may be dropped.
    usable = len(batches) - len(batches) % d.world if d.world > 1 else len(batches)
    return batches[d.rank : usable : d.world]


def train_stage(
    config: RuntimeConfig, stage: StageSpec, model: GPT2LMHeadModel, examples: list[Encoded],
    build_dir: Path, d: Dist, device: torch.device,
) -> dict:
    loss_module = CompletionLoss(model).to(device)
    wrapped: torch.nn.Module = loss_module
    if d.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = _optimizer(model, stage)
    steps_per_epoch = math.ceil(len(_epoch_batches(examples, stage, config.seed, 0, d)) / stage.grad_accum)
    total_steps = stage.max_steps if stage.max_steps is not None else steps_per_epoch * stage.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = get_scheduler(
        stage.lr_schedule if stage.lr_schedule != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=stage.warmup_steps,
        num_training_steps=total_steps,
    )
    scaler = torch.amp.GradScaler(enabled=config.hardware.precision == "fp16")
    metrics_path = build_dir / "metrics.jsonl"
    metrics = open(metrics_path, "w", encoding="utf-8") if d.is_main else None
    step, tokens_seen, started = 0, 0, time.perf_counter()
    window_loss, window_tokens, window_real_tokens, window_start = 0.0, 0, 0, started
    model.train()
    for epoch in range(epochs):
        batches = _epoch_batches(examples, stage, config.seed, epoch, d)
        for i in range(0, len(batches), stage.grad_accum):
            if step == total_steps:
                break
            group = batches[i : i + stage.grad_accum]
            for micro in group:
                batch = collate_for_training([examples[j] for j in micro], config.model.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                with _autocast(config, device):
                    loss_sum, n_tokens = wrapped(**batch)
                # Mean over the supervised tokens of this micro-batch, averaged over accumulation.
                loss = loss_sum / n_tokens.clamp(min=1) / len(group)
                scaler.scale(loss).backward()
                window_loss += loss_sum.item()
                window_tokens += int(n_tokens)
                window_real_tokens += int(batch["attention_mask"].sum())
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), stage.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if step % stage.log_every_steps == 0 or step == total_steps:
                now = time.perf_counter()
                tokens_seen += window_real_tokens * d.world
                record = {
                    "stage": stage.name,
                    "step": step,
                    "epoch": round(epoch + (i + len(group)) / max(1, len(batches)), 3),
                    "loss": round(window_loss / max(1, window_tokens), 5),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": round(float(grad_norm), 4),
                    "tokens_per_s": round(window_real_tokens * d.world / (now - window_start), 1),
                }
                if device.type == "cuda":
                    record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 1024**3, 3)
                if metrics:
                    metrics.write(json.dumps(record, sort_keys=True) + "\n")
                    metrics.flush()
                    eta_s = (now - started) / step * (total_steps - step)
                    print(
                        f"[{stage.name}] step {step}/{total_steps} loss {record['loss']:.4f} "
                        f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s eta {eta_s:.0f}s",
                        file=sys.stderr,
                        flush=True,
                    )
                window_loss, window_tokens, window_real_tokens, window_start = 0.0, 0, 0, now
    if metrics:
        metrics.close()
    wall_s = time.perf_counter() - started
    return {"stage": stage.name, "steps": total_steps, "wall_s": round(wall_s, 2), "tokens": tokens_seen,
            "tokens_per_s": round(tokens_seen / wall_s, 1)}


def save_outputs(config: RuntimeConfig, stage: StageSpec, model: GPT2LMHeadModel, build_dir: Path) -> Path:
    """Model, tokenizer and the exact template, written to a temp dir and renamed into place."""
    final = build_dir / MODEL_DIR
    tmp = build_dir / f".{MODEL_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(build_dir / config.tokenizer.file),
        eos_token=config.tokenizer.eos_token,
        pad_token=config.tokenizer.pad_token,
        model_max_length=config.model.n_positions,
    )
    tokenizer.save_pretrained(tmp)
    data = config.data[stage.data]
    template = {
        **data.template.model_dump(mode="json"),
        "max_total_tokens": data.max_total_tokens,
        "engine": "jinja2-sandboxed-strict",
    }
    (tmp / TEMPLATE_FILE).write_text(json.dumps(template, indent=2, sort_keys=True) + "\n")
    if final.exists():
        previous = build_dir / f".{MODEL_DIR}.previous"
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
        os.replace(tmp, final)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


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
    d = setup_distributed(config.hardware.device)
    device = _device(config, d)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build_model(config.model).to(device)
    reports = []
    for stage in config.stages:
        examples = read_examples(args.build_dir / config.data[stage.data].train)
        reports.append(train_stage(config, stage, model, examples, args.build_dir, d, device))
    if d.is_main:
        path = save_outputs(config, config.stages[-1], model, args.build_dir)
        (args.build_dir / "train_report.json").write_text(json.dumps({"stages": reports}, indent=2, sort_keys=True) + "\n")
        print(f"saved model, tokenizer and template to {path}", file=sys.stderr)
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
