"""Training: runs the build's stages in order, resumably, and saves what a user can take elsewhere.

Launched by the build's `launch.sh` through torchrun: `python -m runtime.train BUILD_DIR`.
One process or several: DistributedDataParallel (gloo on CPU, NCCL on GPU), or DeepSpeed ZeRO
when the build plans it.

What lands in the build directory:
  checkpoints/          every `save_every_steps`, the newest `keep_checkpoints` (runtime/checkpoint.py)
  stages/<stage>/       each finished stage's model or adapter, and `done.json` with its report
  model/                the last stage's output: HF model or peft adapter, tokenizer, exact template
  model-merged/         LoRA merged into the base weights, when the adapter asks for `merge`
  metrics.jsonl         one line per logged step; train_report.json; run_report.{json,md}; loss.png
Running again continues from the newest usable checkpoint and skips finished stages.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn that it guessed
from transformers import PreTrainedTokenizerFast, get_scheduler

from runtime import checkpoint as ckpt
from runtime.contract.files import RunLockBusy, run_lock, write_failure
from runtime import dpo, ppo, reward
from runtime.contract.config import (
    RUNTIME_CONFIG_FILE, IncompatibleBuildError, RuntimeConfig, StageSpec, load_runtime_config, unsupported,
    uses_deepspeed,
)
from runtime.data import collate_rows, length_grouped_batches, read_training_rows
from runtime.model import (
    ModelLoadError, TokenLoss, apply_adapter, count_parameters, load_model,
)
from runtime.objective import Objective

MODEL_DIR = "model"
MERGED_DIR = "model-merged"
STAGES_DIR = "stages"
TEMPLATE_FILE = "recipe_template.json"
TRAINABLE_FILE = "trainable.pt"


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


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
    """The planned optimizer; weight decay on matrices only (biases and layer norms are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": stage.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if stage.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=stage.learning_rate, momentum=0.9)
    if stage.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=stage.learning_rate, scale_parameter=False, relative_step=False)
    return torch.optim.AdamW(groups, lr=stage.learning_rate, betas=stage.adam_betas, eps=stage.adam_eps)


def _scheduler(optimizer: torch.optim.Optimizer, stage: StageSpec, total_steps: int):
    return get_scheduler(
        stage.lr_schedule if stage.lr_schedule != "constant" else "constant_with_warmup",
        optimizer, num_warmup_steps=stage.warmup_steps, num_training_steps=total_steps,
    )


def epoch_groups(rows: Sequence, stage: StageSpec, seed: int, epoch: int, d: Dist) -> list[list[list[int]]]:
    """This rank's micro-batches of one epoch, grouped into optimizer steps (grad_accum each).

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches the
    interrupted one would have."""
    batches = length_grouped_batches([len(r) for r in rows], stage.micro_batch_size, seed + epoch,
                                     group=stage.length_grouping)
    # Every rank must take the same number of steps; the last few batches may be dropped.
    usable = len(batches) - len(batches) % d.world if d.world > 1 else len(batches)
    mine = batches[d.rank : usable : d.world]
    return [mine[i : i + stage.grad_accum] for i in range(0, len(mine), stage.grad_accum)]


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Progress:
    """Rank 0's view of training: a progress bar on a terminal, a line per log step otherwise."""

    EXTRA = ("accuracy", "margin", "reward_mean", "kl")  # shown beside the loss when a stage logs them

    def __init__(self, stage: StageSpec, total: int, start: int, enabled: bool):
        self.stage, self.total, self.enabled = stage, total, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage.name, unit="step", dynamic_ncols=True)

    def update(self, step: int, record: dict | None, eta_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if record:
                extra = {key: f"{record[key]:.4f}" for key in self.EXTRA if key in record}
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", **extra, tok_s=f"{record['tokens_per_s']:.0f}")
        elif record:
            extra = "".join(f" {key} {record[key]:.4f}" for key in self.EXTRA if key in record)
            print(
                f"[{self.stage.name}] step {step}/{self.total} loss {record['loss']:.4f}{extra} lr {record['lr']:.2e} "
                f"{record['tokens_per_s']:.0f} tok/s eta {eta_s:.0f}s",
                file=sys.stderr, flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TorchBackend:
    """Plain PyTorch: one process, or DistributedDataParallel across several."""

    def __init__(self, config: RuntimeConfig, stage: StageSpec, model: torch.nn.Module, loss: torch.nn.Module,
                 d: Dist, device: torch.device, total_steps: int):
        self.config, self.stage, self.model, self.d = config, stage, model, d
        self.loss_module = loss.to(device)
        self.wrapped: torch.nn.Module = self.loss_module
        if d.world > 1:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.optimizer = _optimizer(model, stage)
        self.scheduler = _scheduler(self.optimizer, stage, total_steps)
        self.scaler = torch.amp.GradScaler(enabled=config.hardware.precision == "fp16")

    def forward(self, batch: dict) -> tuple:
        return self.wrapped(**batch)

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        sync = contextlib.nullcontext() if last_micro or self.d.world == 1 else self.wrapped.no_sync()
        with sync:
            self.scaler.scale(loss).backward()

    def step(self) -> float:
        self.scaler.unscale_(self.optimizer)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.stage.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(grad_norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path) -> None:
        """Every rank calls this; rank 0 writes the shared state (DDP replicas are identical)."""
        if self.d.is_main:
            trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
            torch.save(trainable, folder / TRAINABLE_FILE)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict()}, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        trainable = torch.load(folder / TRAINABLE_FILE, map_location="cpu", weights_only=True)
        _load_trainable(self.model, trainable, folder)
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def trained_model(self) -> torch.nn.Module:
        return self.model


def _load_trainable(model: torch.nn.Module, tensors: dict, folder: Path) -> None:
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
    unknown = sorted(set(tensors) - set(params))
    if missing or unknown:
        raise ckpt.CheckpointError(
            f"{folder} does not match this model (missing {missing[:3]}, unexpected {unknown[:3]}); "
            "it was written by a different build"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def _uses_deepspeed(config: RuntimeConfig) -> bool:
    return uses_deepspeed(config.hardware)


def _make_backend(run: "Run", stage: StageSpec, objective: Objective, total_steps: int):
    if _uses_deepspeed(run.config):
        from runtime.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(run, stage, objective.model, objective.loss, total_steps)
    return TorchBackend(run.config, stage, objective.model, objective.loss, run.d, run.device, total_steps)


@dataclass
class Run:
    """What every stage needs to know about this run."""

    config: RuntimeConfig
    build_dir: Path
    d: Dist
    device: torch.device
    config_sha256: str
    resume: tuple[Path, ckpt.TrainState] | None

    @property
    def checkpoints(self) -> Path:
        return self.build_dir / ckpt.CHECKPOINT_DIR

    def log(self, message: str) -> None:
        if self.d.is_main:
            print(message, file=sys.stderr, flush=True)


def language_model_objective(run: Run, stage: StageSpec, model: torch.nn.Module) -> Objective:
    """pretrain and sft: cross-entropy on the supervised tokens (every token when pretraining)."""
    data = run.config.data[stage.data]
    rows = read_training_rows(run.build_dir / data.train,
                              supervise_prompt=stage.kind == "pretrain" or data.template.loss == "all")
    model = apply_adapter(model, stage.adapter)
    pad_id = run.config.model.pad_token_id
    return Objective(rows=rows, loss=TokenLoss(model), model=model, collate=lambda items: collate_rows(items, pad_id))


# Stage kinds that learn from a fixed data set, each with the objective it optimises. PPO samples
# its own data and runs its own loop (runtime/ppo.py); `train` dispatches on STAGE_KINDS.
OBJECTIVES = {
    "pretrain": language_model_objective,
    "sft": language_model_objective,
    "reward": reward.objective,
    "dpo": dpo.objective,
}


def train_stage(run: Run, index: int, stage: StageSpec, model: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    """One stage through the shared loop: returns the trained model and the stage's report."""
    config, d = run.config, run.d
    objective = OBJECTIVES[stage.kind](run, stage, model)
    rows, model = objective.rows, objective.model
    params_total, params_trainable = count_parameters(model)
    steps_per_epoch = len(epoch_groups(rows, stage, config.seed, 0, d))
    if steps_per_epoch == 0:
        raise RuntimeError(f'stage "{stage.name}": {len(rows)} training rows make no batch for {d.world} processes')
    total_steps = stage.max_steps if stage.max_steps is not None else steps_per_epoch * stage.epochs
    backend = _make_backend(run, stage, objective, total_steps)

    step, tokens, elapsed_before = 0, 0, 0.0
    resume = run.resume if run.resume and run.resume[1].stage_index == index else None
    if resume is not None:
        folder, state = resume
        if state.world_size != d.world:
            raise ckpt.CheckpointError(
                f"{folder} was written by {state.world_size} processes, this run has {d.world}; "
                "resume with the same launch"
            )
        backend.load(folder)
        _set_rng_state(torch.load(folder / f"rng-rank{d.rank}.pt", weights_only=False))
        step, tokens, elapsed_before = state.step, state.tokens, state.elapsed_s
        run.log(f'resuming stage "{stage.name}" at step {step}/{total_steps} from {folder}')

    metrics = None
    if d.is_main:
        fresh = index == 0 and resume is None
        metrics = open(run.build_dir / "metrics.jsonl", "w" if fresh else "a", encoding="utf-8")
    progress = Progress(stage, total_steps, step, d.is_main)
    started = time.perf_counter()
    first_loss = final_loss = None
    window = {"loss": 0.0, "count": 0, "real": 0, "start": started, "stats": {}}
    model.train()
    while step < total_steps:
        epoch, group = divmod(step, steps_per_epoch)
        groups = epoch_groups(rows, stage, config.seed, epoch, d)
        micro_batches = groups[group]
        for k, micro in enumerate(micro_batches):
            batch = objective.collate([rows[j] for j in micro])
            batch = {key: value.to(run.device) for key, value in batch.items()}
            with _autocast(config, run.device):
                out = backend.forward(batch)
            loss_sum, count = out[0], out[1]
            # Mean over the supervised tokens (or pairs, rows) of this micro-batch, averaged over accumulation.
            loss = loss_sum / count.clamp(min=1) / len(micro_batches)
            backend.backward(loss, last_micro=k == len(micro_batches) - 1)
            window["loss"] += loss_sum.item()
            window["count"] += int(count)
            window["real"] += int(batch["attention_mask"].sum())
            for name, value in (out[2] if len(out) > 2 else {}).items():
                window["stats"][name] = window["stats"].get(name, 0.0) + float(value)
        grad_norm = backend.step()
        step += 1
        if step % stage.log_every_steps == 0 or step == total_steps:
            now = time.perf_counter()
            real = _all_ranks_sum(window["real"], d, run.device)
            tokens += real
            record = {
                "stage": stage.name,
                "step": step,
                "epoch": round(epoch + (group + 1) / steps_per_epoch, 3),
                "loss": round(window["loss"] / max(1, window["count"]), 5),
                **{name: round(value / max(1, window["count"]), 5) for name, value in window["stats"].items()},
                "lr": backend.lr(),
                "grad_norm": round(grad_norm, 4),
                "tokens_per_s": round(real / (now - window["start"]), 1),
            }
            if run.device.type == "cuda":
                record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 1024**3, 3)
            else:
                record["peak_rss_gib"] = round(_peak_rss_gib(), 3)
            first_loss = record["loss"] if first_loss is None else first_loss
            final_loss = record["loss"]
            if metrics:
                metrics.write(json.dumps(record, sort_keys=True) + "\n")
                metrics.flush()
            eta = (now - started) / max(1, step - (resume[1].step if resume else 0)) * (total_steps - step)
            progress.update(step, record, eta)
            window = {"loss": 0.0, "count": 0, "real": 0, "start": now, "stats": {}}
        else:
            progress.update(step, None, 0.0)
        if stage.save_every_steps and step % stage.save_every_steps == 0 and step < total_steps:
            next_epoch, next_group = divmod(step, steps_per_epoch)
            state = ckpt.TrainState(
                config_sha256=run.config_sha256, stage_index=index, stage=stage.name, step=step,
                total_steps=total_steps, epoch=next_epoch, batch=next_group * stage.grad_accum,
                tokens=tokens, elapsed_s=round(elapsed_before + time.perf_counter() - started, 3), world_size=d.world,
            )
            _save_checkpoint(run, backend, state, stage.keep_checkpoints)
    progress.close()
    if metrics:
        metrics.close()
    wall_s = elapsed_before + time.perf_counter() - started
    report = {
        "stage": stage.name, "kind": stage.kind, "adapter": stage.adapter.kind, "steps": total_steps,
        "start_step": resume[1].step if resume else 0, "wall_s": round(wall_s, 2), "tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s else 0.0,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(run.device) / 1024**3, 3)
        if run.device.type == "cuda" else None,
        "peak_rss_gib": round(_peak_rss_gib(), 3), "first_loss": first_loss, "final_loss": final_loss,
        "examples": len(rows), "params_total": params_total, "params_trainable": params_trainable,
        "loss_unit": objective.unit,
    }
    trained = backend.trained_model()
    if objective.heldout is not None and d.is_main:
        report["heldout"] = objective.heldout()
        run.log(f'[{stage.name}] held out: {json.dumps(report["heldout"], sort_keys=True)}')
    return trained, report


def _all_ranks_sum(value: int, d: Dist, device: torch.device | None = None) -> int:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(t)
    return int(t.item())


def _save_checkpoint(run: Run, backend, state: ckpt.TrainState, keep: int) -> None:
    staging = ckpt.staging_dir(run.checkpoints, state)

    def attempt(write) -> str | None:
        """None when `write()` worked; what ran out (disk, quota, file size limit) when it did not."""
        try:
            write()
        except (OSError, RuntimeError) as exc:
            problem = write_failure(staging, exc)
            if problem is None:
                raise
            return problem
        return None

    def give_up_if_failed(problem: str | None) -> None:
        # A barrier that also tells every rank whether any rank failed, so none is left waiting.
        # (On the run's device: NCCL reduces CUDA tensors only.)
        failed = torch.tensor([int(problem is not None)], device=run.device)
        if run.d.world > 1:
            dist.all_reduce(failed)
        if not int(failed.item()):
            return
        if run.d.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # give back the space; the last good checkpoint is untouched
        done = ckpt.complete_checkpoints(run.checkpoints)
        if done:
            then = f"the newest good checkpoint, {done[-1].name}, is untouched; free some space and run again to " \
                "resume from it"
        else:
            then = "there is no earlier checkpoint; free some space and run again"
        raise ckpt.CheckpointError(
            f"could not write checkpoint {run.checkpoints / ckpt.checkpoint_name(state)}: "
            f"{problem or 'another process could not write its part'}; {then}")

    def prepare() -> None:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)

    def write_own_part() -> None:
        torch.save(_rng_state(), staging / f"rng-rank{run.d.rank}.pt")
        backend.save(staging)

    def commit() -> None:
        ckpt.commit(run.checkpoints, staging, state, keep)

    give_up_if_failed(attempt(prepare) if run.d.is_main else None)
    give_up_if_failed(attempt(write_own_part))
    give_up_if_failed(attempt(commit) if run.d.is_main else None)


# ---------------------------------------------------------------------------------------------
# stage outputs


def _stage_dir(build_dir: Path, stage: StageSpec) -> Path:
    return build_dir / STAGES_DIR / stage.name


def _finished(run: Run, stage: StageSpec) -> dict | None:
    """The report of a stage this build already finished (same runtime.json), else None."""
    try:
        done = json.loads((_stage_dir(run.build_dir, stage) / "done.json").read_text())
    except (OSError, ValueError):
        return None
    return done["report"] if done.get("config_sha256") == run.config_sha256 else None


def _write_tree(folder: Path, write) -> None:
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


def _save_model(run: Run, stage: StageSpec, model: torch.nn.Module, folder: Path) -> None:
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

    _write_tree(folder, write)


def _merged(model: torch.nn.Module) -> torch.nn.Module:
    """LoRA folded into the base weights (a plain transformers model); other models unchanged."""
    if hasattr(model, "merge_and_unload") and getattr(model, "active_peft_config", None) is not None \
            and not model.active_peft_config.is_prompt_learning:
        return model.merge_and_unload()
    return model


def _finish_stage(run: Run, stage: StageSpec, model: torch.nn.Module, report: dict, last: bool) -> None:
    if not run.d.is_main:
        return
    stage_dir = _stage_dir(run.build_dir, stage)
    stage_dir.mkdir(parents=True, exist_ok=True)
    _save_model(run, stage, model, stage_dir / MODEL_DIR)
    if last:
        _save_model(run, stage, model, run.build_dir / MODEL_DIR)
        if stage.adapter.kind == "lora" and stage.adapter.params.get("merge"):
            import copy

            _save_model(run, stage, _merged(copy.deepcopy(model)), run.build_dir / MERGED_DIR)
    done = {"config_sha256": run.config_sha256, "report": report}
    (stage_dir / "done.json").write_text(json.dumps(done, indent=2, sort_keys=True) + "\n")


def load_stage_output(config: RuntimeConfig, build_dir: Path, stage_name: str) -> torch.nn.Module:
    """A finished stage's model as the next stage starts from it: adapters merged into their base.
    A reward stage's output is a sequence-classification model (the reward head included)."""
    stage = next(s for s in config.stages if s.name == stage_name)
    folder = _stage_dir(build_dir, stage) / MODEL_DIR
    if stage.adapter.kind in ("lora", "prefix"):
        from peft import PeftModel

        base = starting_model(config, build_dir, stage)
        if stage.kind == "reward" and not reward.is_scalar(base):
            base = reward.scalar_model(base, config.seed)  # its head is replaced by the saved one
        return _merged(PeftModel.from_pretrained(base, folder))
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if stage.kind == "reward" else AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=torch.float32, attn_implementation=config.hardware.attention)


def reference_model(run: Run, name: str) -> torch.nn.Module:
    """A frozen copy of "base" or of an earlier stage's output, on this run's device."""
    stage = next((s for s in run.config.stages if s.name == name), None)
    if name == "base" or stage is None:
        torch.manual_seed(run.config.seed)
        model = load_model(run.config.model, run.config.hardware)
    else:
        model = load_stage_output(run.config, run.build_dir, name)
    model.requires_grad_(False)
    return model.eval().to(run.device)


def starting_model(config: RuntimeConfig, build_dir: Path, stage: StageSpec) -> torch.nn.Module:
    """The weights a stage starts from: the base model, or an earlier stage's output."""
    if stage.start == "base":
        torch.manual_seed(config.seed)  # scratch weights are the same on every rank and every attempt
        return load_model(config.model, config.hardware)
    return load_stage_output(config, build_dir, stage.start)


# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _run_lock(build_dir: Path, d: Dist):
    """One training run per build directory at a time (rank 0 holds the lock)."""
    if not d.is_main:
        yield
        return
    try:
        with run_lock(build_dir):
            yield
    except RunLockBusy:
        raise ckpt.CheckpointError(
            f"another run is training {build_dir} right now; wait for it to finish "
            "(or compile the recipe into another directory with --out)"
        ) from None


def train(config: RuntimeConfig, build_dir: Path, d: Dist) -> dict:
    device = _device(config, d)
    config_sha = hashlib.sha256((build_dir / RUNTIME_CONFIG_FILE).read_bytes()).hexdigest()
    root = build_dir / ckpt.CHECKPOINT_DIR
    if d.is_main:
        ckpt.remove_stale_staging(root)
    d.barrier()
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if d.is_main else (lambda m: None)
    resume = ckpt.latest_usable(root, config_sha, log)
    run = Run(config, build_dir, d, device, config_sha, resume)
    reports = []
    model = None
    previous = None
    for index, stage in enumerate(config.stages):
        last = index == len(config.stages) - 1
        done = _finished(run, stage)
        if done is not None:  # its output is newer than any of its checkpoints
            run.log(f'stage "{stage.name}" already finished in this build; skipping it')
            reports.append(done)
            model, previous = None, stage.name
            continue
        if model is None or stage.start != previous:
            model = starting_model(config, build_dir, stage)
        model = model.to(device)
        runner = ppo.train_stage if stage.kind == "ppo" else train_stage
        trained, report = runner(run, index, stage, model)
        _finish_stage(run, stage, trained, report, last)
        d.barrier()
        reports.append(report)
        # After ZeRO-3 the parameters still carry DeepSpeed's partitioning state; the next stage
        # starts from the saved output instead.
        model = None if _uses_deepspeed(config) and config.hardware.zero_stage == 3 else _merged(trained)
        previous = stage.name
    train_report = {"device": device.type, "precision": config.hardware.precision, "world_size": d.world,
                    "stages": reports}
    if d.is_main:
        (build_dir / "train_report.json").write_text(json.dumps(train_report, indent=2, sort_keys=True) + "\n")
        _write_run_report(build_dir)
    return train_report


def _write_run_report(build_dir: Path) -> None:
    from runtime.report import write_run_report

    write_run_report(build_dir)


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
    try:
        with _run_lock(args.build_dir, d):
            train(config, args.build_dir, d)
    except (ckpt.CheckpointError, ModelLoadError, IncompatibleBuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a model, report or log that found no space; other errors are bugs
        problem = write_failure(args.build_dir, exc)
        if problem is None:
            raise
        print(f"error: could not write {exc.filename or args.build_dir}: {problem}; free some space and run "
              "again (finished stages and checkpoints are kept)", file=sys.stderr)
        return 1
    finally:
        if d.world > 1 and dist.is_initialized():
            gc.collect()  # engines and their hooks go before the process group does
            dist.destroy_process_group()
    if d.is_main:
        print(f"saved model, tokenizer and template to {args.build_dir / MODEL_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
