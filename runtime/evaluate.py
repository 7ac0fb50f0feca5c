"""Evaluate a trained build on its held-out split: greedy generation after the prompt, the label
extracted by the recipe's rule, accuracy against the majority-class baseline, and the loss and
perplexity of the completion tokens. Writes `eval.json`, `eval.md`, `predictions.jsonl` and
`confusion.png` into the build directory, replacing an earlier eval's as one set.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from runtime.contract.artifacts import EVAL_FORMAT_VERSION, EvalReport, dumps
from runtime.contract.config import EvalSpec, IncompatibleBuildError, RuntimeConfig, load_runtime_config
from runtime.contract.files import folder_lock, replace_files, roll_back_interrupted, write_failure
from runtime.contract.layout import (
    CONFUSION_PNG, DEEPSPEED_TAG, EVAL_FILES, EVAL_JSON, EVAL_MD, EVAL_SWAP, MODEL_DIR, PREDICTIONS_FILE,
    TRAINABLE_FILE,
)
from runtime.core.classify import completion_losses, predict_labels
from runtime.core.data import IGNORE_INDEX, collate_rows, read_examples, read_training_rows
from runtime.core.losses import TokenLoss
from runtime.core.model import ModelLoadError, apply_adapter
from runtime.core.outputs import load_trainable, merged, starting_model
from runtime.harness import harness_md, run_harness

SAMPLE_TOKENS = 128  # at most this many new tokens per sample generation of a language-model eval


def classification_report(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str], majority: str) -> dict:
    """Accuracy, per-class precision/recall/F1, macro-F1, confusion matrix and the majority baseline."""
    n = len(gold)
    correct = sum(g == p for g, p in zip(gold, predicted))
    per_class = {}
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        support = sum(g == label for g in gold)
        predicted_n = sum(p == label for p in predicted)
        precision = tp / predicted_n if predicted_n else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "support": support,
            "predicted": predicted_n,
            "correct": tp,
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
        }
    columns = list(labels) + ["(other)"]
    confusion = {g: {c: 0 for c in columns} for g in labels}
    for g, p in zip(gold, predicted):
        confusion[g][p if p in labels else "(other)"] += 1
    return {
        "n": n,
        "accuracy": round(correct / n, 4),
        "majority_class": majority,
        "majority_baseline": round(sum(g == majority for g in gold) / n, 4),
        "macro_f1": round(sum(c["f1"] for c in per_class.values()) / len(labels), 4),
        "per_class": per_class,
        "confusion": confusion,
        "invalid_predictions": sum(p not in labels for p in predicted),
    }


def load_trained(config: RuntimeConfig, build_dir: Path, model_dir: Path) -> PreTrainedModel:
    """A trained model or adapter from the build; an adapter is attached to the weights its stage
    started from (the base model, or the earlier stage it continued)."""
    if (model_dir / TRAINABLE_FILE).is_file():  # a training checkpoint: the starting weights plus what trained
        stage = config.stages[-1]
        model = apply_adapter(starting_model(config, build_dir, stage), stage.adapter)
        tensors = torch.load(model_dir / TRAINABLE_FILE, map_location="cpu", weights_only=True)
        load_trainable(model, tensors, model_dir)
        return model.eval()
    if (model_dir / DEEPSPEED_TAG).is_dir():
        raise FileNotFoundError(f"{model_dir} is a DeepSpeed checkpoint; evaluate the saved model (BUILD/model) "
                                "or convert it with the zero_to_fp32.py script inside it")
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        stage = config.stages[-1]
        return PeftModel.from_pretrained(starting_model(config, build_dir, stage), model_dir).eval()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no trained model at {model_dir}; run `recipe run {build_dir}` first")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def language_model_eval(model: PreTrainedModel, tokenizer, config: RuntimeConfig, build_dir: Path) -> EvalReport:
    """Held-out loss and perplexity over the supervised tokens (the completion, or the assistant
    turns of chat data, exactly as in training), and a few sample generations."""
    spec: EvalSpec = config.eval
    data = config.data[spec.data]
    rows = read_training_rows(build_dir / data.heldout, supervise_prompt=data.template.loss == "all")
    loss_fn = TokenLoss(model)
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), spec.batch_size):
        batch = collate_rows([rows[i] for i in order[start : start + spec.batch_size]], config.model.pad_token_id)
        loss_sum, n = loss_fn(**batch)
        total += float(loss_sum)
        count += int(n)
    mean = total / max(1, count)
    # Generation stops at the end-of-sequence token or at whatever token closes a supervised
    # span in the data (a chat template's end-of-turn marker), and is capped: samples are a look.
    stop = {config.model.eos_token_id} | {[t for t in r.labels if t != IGNORE_INDEX][-1]
                                          for r in rows if any(t != IGNORE_INDEX for t in r.labels)}
    stop.discard(None)
    samples = []
    for row in rows[: spec.samples]:
        first = next((i for i, label in enumerate(row.labels) if label != IGNORE_INDEX), len(row))
        prompt = torch.tensor([row.input_ids[:first]])
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=min(spec.max_new_tokens, SAMPLE_TOKENS),
                             pad_token_id=config.model.pad_token_id, eos_token_id=sorted(stop))
        samples.append({"line": row.line, "prompt": tokenizer.decode(row.input_ids[:first]),
                        "reference": tokenizer.decode([t for t in row.labels if t != IGNORE_INDEX]),
                        "generated": tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)})
    return EvalReport(format_version=EVAL_FORMAT_VERSION, n=len(rows), supervised_tokens=count, loss=round(mean, 4),
                      perplexity=round(math.exp(mean), 4), samples=samples)


def evaluate(build_dir: Path, checkpoint: Path | None = None) -> EvalReport:
    config = load_runtime_config(build_dir)
    spec: EvalSpec = config.eval
    model_dir = checkpoint or build_dir / MODEL_DIR
    torch.manual_seed(config.seed)
    model = load_trained(config, build_dir, model_dir)
    if (model_dir / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(build_dir / config.tokenizer.file))
    if spec.kind in ("language_model", "harness"):
        report = language_model_eval(model, tokenizer, config, build_dir)
        md = render_language_model_md(config, report)
        if spec.kind == "harness":  # the harness's tasks beside the held-out loss
            harness = run_harness(merged(model), tokenizer, config)
            report = EvalReport(**report.model_dump(exclude_unset=True), harness=harness)
            md += "\n".join(harness_md(harness))
        publish(build_dir, {EVAL_JSON: dumps(report).encode(), EVAL_MD: md.encode()})
        return report
    data = config.data[spec.data]
    heldout = read_examples(build_dir / data.heldout)
    train_labels = Counter(e.label for e in read_examples(build_dir / data.train))
    majority = max(sorted(train_labels), key=lambda k: train_labels[k])
    pad_id = config.model.pad_token_id

    started = time.perf_counter()
    predicted, texts, new_tokens = predict_labels(model, tokenizer, config, heldout)
    generation_s = time.perf_counter() - started
    gold = [e.label.lower() for e in heldout]
    labels = [label.lower() for label in spec.labels]
    figures = classification_report(gold, predicted, labels, majority.lower())
    # The same eval on the weights training started from: what the training itself bought.
    untrained = starting_model(config, build_dir, config.stages[0]).eval()
    untrained_predicted, _, _ = predict_labels(untrained, tokenizer, config, heldout)
    del untrained
    untrained_accuracy = round(sum(g == p for g, p in zip(gold, untrained_predicted)) / len(gold), 4)

    losses = completion_losses(model, heldout, pad_id=pad_id, batch_size=spec.batch_size)
    mean_loss = sum(losses) / len(losses)
    report = EvalReport(
        format_version=EVAL_FORMAT_VERSION, **figures, untrained_accuracy=untrained_accuracy, extract=spec.extract,
        loss=round(mean_loss, 4), perplexity=round(math.exp(mean_loss), 4), generation_s=round(generation_s, 2),
        generated_tokens_per_s=round(sum(len(t) for t in new_tokens) / generation_s, 1),
        samples=[{"line": e.line, "prompt": tokenizer.decode(e.prompt), "generated": t, "label": e.label}
                 for e, t in list(zip(heldout, texts))[:5]],
    )
    png = confusion_png(report)
    predictions = "".join(
        json.dumps({"line": e.line, "label": e.label, "generated": text, "predicted": p, "loss": round(loss, 5)},
                   sort_keys=True) + "\n"
        for e, text, p, loss in zip(heldout, texts, predicted, losses))
    publish(build_dir, {EVAL_JSON: dumps(report).encode(), CONFUSION_PNG: png,
                        EVAL_MD: render_eval_md(config, report, png is not None).encode(),
                        PREDICTIONS_FILE: predictions.encode()})
    return report


def publish(build_dir: Path, outputs: dict[str, bytes | None]) -> None:
    """Replace the eval outputs in the build directory as one set: a reader never finds
    eval.json of one eval beside predictions.jsonl of another, even when the eval is killed while
    writing them (see runtime.contract.files.replace_files). Outputs of an earlier eval that this one
    does not produce are removed with it. A swap an earlier eval left half done is undone first."""
    files = {name: outputs.get(name) for name in EVAL_FILES}
    with folder_lock(build_dir):
        roll_back_interrupted(build_dir, EVAL_SWAP, clean=True)
        replace_files(build_dir, EVAL_SWAP, files)


def confusion_png(report: EvalReport | Mapping[str, Any]) -> bytes | None:
    """The confusion matrix as a PNG (gold rows, predicted columns, counts in the cells), from the
    report or its JSON data (eval.json)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(report, EvalReport):
        report = EvalReport.model_validate(report)
    confusion = report.confusion
    gold = list(confusion)
    if not gold:
        return None
    columns = list(confusion[gold[0]])
    counts = [[confusion[g][c] for c in columns] for g in gold]
    figure = Figure(figsize=(1.2 * len(columns) + 2, 1.0 * len(gold) + 1.5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(columns)), labels=columns)
    ax.set_yticks(range(len(gold)), labels=gold)
    ax.set_xlabel("predicted")
    ax.set_ylabel("label")
    top = max(max(row) for row in counts) or 1
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > top / 2 else "black")
    ax.set_title(f"accuracy {report.accuracy:.1%} on {report.n}")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", metadata={"Software": None})
    return png.getvalue()


def render_eval_md(config: RuntimeConfig, report: EvalReport, with_plot: bool) -> str:
    labels = list(report.per_class)
    lines = [
        f"# Eval: {config.name}",
        "",
        f"{report.n} held-out examples; labels extracted by `{report.extract}`.",
        "",
        "| | accuracy |",
        "|---|---:|",
        f"| trained model | {report.accuracy:.1%} |",
        f"| majority class (`{report.majority_class}`) | {report.majority_baseline:.1%} |",
        f"| untrained (the weights training started from) | {report.untrained_accuracy:.1%} |",
        "",
        f"Macro-F1 {report.macro_f1:.3f}; {report.invalid_predictions} predictions outside the label set; "
        f"completion loss {report.loss:.4f} (perplexity {report.perplexity:.2f}).",
        "",
        "| label | support | predicted | precision | recall | F1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        c = report.per_class[label]
        lines.append(f"| {label} | {c.support} | {c.predicted} | {c.precision:.3f} | {c.recall:.3f} | {c.f1:.3f} |")
    columns = list(report.confusion[labels[0]]) if labels else []
    lines += ["", "Confusion (rows: label, columns: predicted):", "",
              "| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(str(report.confusion[label][c]) for c in columns) + " |")
    if with_plot:
        lines += ["", "![confusion](confusion.png)"]
    return "\n".join(lines) + "\n"


def render_language_model_md(config: RuntimeConfig, report: EvalReport) -> str:
    lines = [f"# Eval: {config.name}", "",
             f"{report.n} held-out examples, {report.supervised_tokens} supervised tokens: loss "
             f"{report.loss:.4f}, perplexity {report.perplexity:.2f}.", ""]
    for sample in report.samples:
        lines += [f"## Held-out line {sample.line}", "", "Prompt:", "", "```", sample.prompt.rstrip(), "```", "",
                  "Reference:", "", "```", (sample.reference or "").rstrip(), "```", "", "Generated:", "", "```",
                  sample.generated.rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.evaluate")
    parser.add_argument("build_dir", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        report = evaluate(args.build_dir, args.checkpoint)
    except (IncompatibleBuildError, FileNotFoundError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        problem = write_failure(args.build_dir, exc)
        if problem is None:
            raise
        print(f"error: could not write the eval outputs into {args.build_dir}: {problem}; the previous ones are "
              "unchanged; free some space and run `recipe eval` again", file=sys.stderr)
        return 1
    if report.accuracy is None:
        print(f"eval: held-out loss {report.loss:.4f}, perplexity {report.perplexity:.2f}", file=sys.stderr)
        return 0
    print(
        f"eval: accuracy {report.accuracy:.4f} (majority baseline {report.majority_baseline:.4f}, "
        f"untrained {report.untrained_accuracy:.4f}), "
        f"macro-F1 {report.macro_f1:.4f}, completion loss {report.loss:.4f}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
