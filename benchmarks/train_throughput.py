"""Training throughput against the original-script approach, on the same model and data.

    .venv/bin/python benchmarks/train_throughput.py [--epochs N] [--max-steps N] [--threads N] [--keep DIR]

Compiles the tweet-sentiment recipe at the benchmark size (GPT-2, n_embd 128, 4 layers, 4 heads,
vocab 50,257, micro-batch 32) and trains it twice on the same pre-tokenized 3,360 tweets:

- baseline, the way a first script does it: `transformers.Trainer` with `TrainingArguments`
  (same learning rate, schedule, warmup, weight decay, gradient clipping, Adam betas, epochs, batch
  size and seed as the build; fp32 on the CPU; no evaluation or checkpoints during training), every
  example padded to the build's `max_total_tokens`, and the language-model loss on every real token,
  prompt included. Padding positions are labelled -100 so that the loss counts real tokens only;
  the pad id is the end-of-text id, which never occurs inside an example here.
- ours: `python -m runtime.train BUILD` in a subprocess, then `python -m runtime.evaluate BUILD`.

Both sides use the same number of CPU threads. Throughput is real (non-pad) tokens per second of
the training loop: tokens of the examples actually trained on, divided by the training wall time
(Trainer's `train_runtime` for the baseline; `train_report.json` for ours, or the subprocess's
wall time when the report lacks the figures). Held-out accuracy uses the same rule for both:
greedy decoding after the prompt, first word of the completion compared to the label
(`runtime.evaluate`).

Prints the configuration and, per side, throughput, wall time, padding fraction and accuracy, then
the speed-up; the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.contract.artifacts import read_eval_report, read_train_report  # noqa: E402
from runtime.contract.config import RuntimeConfig, load_runtime_config  # noqa: E402
from runtime.contract.layout import EVAL_JSON, TRAIN_REPORT_FILE  # noqa: E402
from runtime.core.data import Encoded, read_examples  # noqa: E402

RECIPE = "specs/examples/tweet-sentiment.toml"
# The model and batch the throughput target was measured on.
BENCHMARK_SIZE = {"model.n_embd": 128, "model.n_layer": 4, "model.n_head": 4, "train.micro_batch_size": 32}


def compile_build(build: Path, epochs: int, max_steps: int | None) -> None:
    overrides = {**BENCHMARK_SIZE, "train.epochs": epochs}
    if max_steps is not None:
        # On the stage: [train] may not hold both epochs and max_steps, a stage may narrow them.
        overrides["stages.0.max_steps"] = max_steps
    command = [sys.executable, "-m", "compiler.cli", "compile", RECIPE, "--out", str(build)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    # Compiler output goes to stderr so that stdout ends with the JSON line.
    subprocess.run(command, check=True, cwd=REPO, stdout=sys.stderr)


def _thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONDONTWRITEBYTECODE": "1"}


def _ours_batches(config: RuntimeConfig, lengths: list[int]) -> list[list[int]] | None:
    """The micro-batches a single-process run of the runtime trains on, for the figures its report
    does not give; None when the runtime's batching no longer matches this reconstruction."""
    try:
        from runtime.core.data import length_grouped_batches

        stage = config.stages[0]
        steps_per_epoch = math.ceil(math.ceil(len(lengths) / stage.micro_batch_size) / stage.grad_accum)
        total_steps = stage.max_steps if stage.max_steps is not None else steps_per_epoch * stage.epochs
        used: list[list[int]] = []
        for epoch in range(math.ceil(total_steps / steps_per_epoch)):
            batches = length_grouped_batches(
                lengths, stage.micro_batch_size, config.seed + epoch, group=stage.length_grouping
            )
            used += batches[: (total_steps - epoch * steps_per_epoch) * stage.grad_accum]
        return used
    except (ImportError, TypeError):
        return None


def run_ours(build: Path, config: RuntimeConfig, examples: list[Encoded], threads: int) -> dict:
    def runtime(module: str) -> None:
        command = [sys.executable, "-m", module, str(build)]
        subprocess.run(command, check=True, cwd=REPO, env=_thread_env(threads), stdout=sys.stderr)

    started = time.perf_counter()
    runtime("runtime.train")
    process_wall_s = time.perf_counter() - started
    runtime("runtime.evaluate")

    lengths = [len(e) for e in examples]
    batches = _ours_batches(config, lengths)
    if batches is not None:
        counted_tokens = sum(lengths[i] for b in batches for i in b)
        padding = 1 - counted_tokens / sum(max(lengths[i] for i in b) * len(b) for b in batches)
    else:
        counted_tokens, padding = config.stages[0].epochs * sum(lengths), None
    stages = read_train_report(build / TRAIN_REPORT_FILE).stages
    # The report's figures cover the training loop only; process start, model build and saving
    # are left out, as Trainer's train_runtime leaves them out for the baseline.
    tokens = sum(s.tokens or 0 for s in stages) or counted_tokens
    wall_s = sum(s.wall_s or 0.0 for s in stages) or process_wall_s
    evaluation = read_eval_report(build / EVAL_JSON)
    return {
        "tokens": tokens,
        "wall_s": round(wall_s, 2),
        "process_wall_s": round(process_wall_s, 2),
        "tokens_per_s": round(tokens / wall_s, 1),
        "steps": sum(s.steps or 0 for s in stages),
        "padding_fraction": None if padding is None else round(padding, 4),
        "accuracy": evaluation.accuracy,
        "majority_baseline": evaluation.majority_baseline,
    }


def _padded_dataset(examples: list[Encoded], width: int, pad_id: int) -> list[dict]:
    """Every example padded to `width`; labels are the input ids at every real position."""
    import torch

    rows = []
    for e in examples:
        ids = list(e.prompt + e.completion)
        n = len(ids)
        rows.append(
            {
                "input_ids": torch.tensor(ids + [pad_id] * (width - n)),
                "attention_mask": torch.tensor([1] * n + [0] * (width - n)),
                "labels": torch.tensor(ids + [-100] * (width - n)),
            }
        )
    return rows


def _baseline_model(config: RuntimeConfig):
    """The same GPT-2 the runtime builds (same shape, same initialisation code)."""
    from runtime.core.model import build_model

    return build_model(config.model)


def run_baseline(build: Path, config: RuntimeConfig, examples: list[Encoded], threads: int, out_dir: Path) -> dict:
    import torch
    from transformers import PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from runtime.core.classify import extract_label, generate_greedy
    from runtime.evaluate import classification_report

    torch.set_num_threads(threads)
    stage, data = config.stages[0], config.data[config.stages[0].data]
    pad_id, eos_id = config.model.pad_token_id, config.model.eos_token_id
    torch.manual_seed(config.seed)
    model = _baseline_model(config)
    seen = {"real": 0, "grid": 0}

    def count_tokens(module, args, kwargs):  # every training forward, so the count is exact
        if module.training:
            mask = kwargs["attention_mask"]
            seen["real"] += int(mask.sum())
            seen["grid"] += mask.numel()

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)

    class StderrLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                print(f"[baseline] step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}",
                      file=sys.stderr, flush=True)

    arguments = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=stage.micro_batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps if stage.max_steps is not None else -1,
        learning_rate=stage.learning_rate,
        lr_scheduler_type=stage.lr_schedule,
        warmup_steps=stage.warmup_steps,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        adam_beta1=stage.adam_betas[0],
        adam_beta2=stage.adam_betas[1],
        adam_epsilon=stage.adam_eps,
        seed=config.seed,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=stage.log_every_steps,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
    )
    train_set = _padded_dataset(examples, data.max_total_tokens, pad_id)
    trainer = Trainer(model=model, args=arguments, train_dataset=train_set, callbacks=[StderrLog()])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    started = time.perf_counter()
    result = trainer.train()
    wall_s = time.perf_counter() - started
    train_runtime_s = result.metrics.get("train_runtime", wall_s)

    model.eval()
    heldout = read_examples(build / data.heldout)
    spec = config.eval
    new_tokens = generate_greedy(
        model, heldout, pad_id=pad_id, eos_id=eos_id, max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(build / config.tokenizer.file))
    predicted = [extract_label(tokenizer.decode(ids, skip_special_tokens=True), spec.extract) for ids in new_tokens]
    majority = max(sorted({e.label for e in examples}), key=lambda k: sum(e.label == k for e in examples))
    evaluation = classification_report(
        [e.label.lower() for e in heldout], predicted, [l.lower() for l in spec.labels], majority.lower()
    )
    return {
        "tokens": seen["real"],
        "wall_s": round(train_runtime_s, 2),
        "process_wall_s": round(wall_s, 2),
        "tokens_per_s": round(seen["real"] / train_runtime_s, 1),
        "steps": result.global_step,
        "padding_fraction": round(1 - seen["real"] / max(1, seen["grid"]), 4),
        "accuracy": evaluation["accuracy"],
        "majority_baseline": evaluation["majority_baseline"],
    }


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction:.1%}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2, help="epochs for both sides (default 2)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap both sides at this many optimizer steps")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both sides (default 2)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR", help="build into DIR and keep it")
    args = parser.parse_args()
    started = time.perf_counter()
    # Other work on the machine slows whichever side it overlaps; the load average makes it visible.
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        build = args.keep.resolve() if args.keep else Path(tmp) / "build"
        compile_build(build, args.epochs, args.max_steps)
        config = load_runtime_config(build)
        stage, data = config.stages[0], config.data[config.stages[0].data]
        examples = read_examples(build / data.train)
        c = config.model.config
        print(
            f"config: GPT-2 n_embd {c['n_embd']}, {c['n_layer']} layers, {c['n_head']} heads, "
            f"vocab {config.model.vocab_size}, max length {data.max_total_tokens}; {len(examples)} train / "
            f"{data.n_heldout} held-out tweets; batch {stage.micro_batch_size}, "
            + (f"{stage.max_steps} steps" if stage.max_steps is not None else f"{stage.epochs} epochs")
            + f", {args.threads} threads",
            flush=True,
        )
        ours = run_ours(build, config, examples, args.threads)
        baseline = run_baseline(build, config, examples, args.threads, Path(tmp) / "trainer")

    for name, side in (("baseline", baseline), ("ours", ours)):
        print(
            f"{name}: {side['tokens_per_s']:.0f} real tokens/s ({side['tokens']} tokens in {side['wall_s']:.1f} s, "
            f"{side['steps']} steps), padding {_percent(side['padding_fraction'])}, "
            f"held-out accuracy {side['accuracy']:.4f}"
        )
    speedup = ours["tokens_per_s"] / baseline["tokens_per_s"]
    run_s = time.perf_counter() - started
    print(f"run: {run_s:.0f} s in all; 1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"speed-up: {speedup:.2f}x real tokens/s; accuracy {ours['accuracy'] - baseline['accuracy']:+.4f} "
          f"(majority class {ours['majority_baseline']})")
    figures = {
        "baseline_tokens_per_s": baseline["tokens_per_s"],
        "ours_tokens_per_s": ours["tokens_per_s"],
        "baseline_accuracy": baseline["accuracy"],
        "ours_accuracy": ours["accuracy"],
        "speedup": round(speedup, 2),
        "baseline_wall_s": baseline["wall_s"],
        "ours_wall_s": ours["wall_s"],
        "baseline_padding_fraction": baseline["padding_fraction"],
        "ours_padding_fraction": ours["padding_fraction"],
        "baseline_steps": baseline["steps"],
        "ours_steps": ours["steps"],
        "majority_baseline": ours["majority_baseline"],
        "threads": args.threads,
        "run_s": round(run_s, 1),
    }
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
