"""Evaluate a trained build on its held-out split: greedy generation after the prompt, the label
extracted by the recipe's rule, accuracy against the majority-class baseline, and the loss and
perplexity of the completion tokens. Writes `eval.json` into the build directory.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from runtime.config import EvalSpec, IncompatibleBuildError, load_runtime_config
from runtime.data import IGNORE_INDEX, Encoded, collate_for_training, collate_prompts_left_padded, read_examples
from runtime.train import MODEL_DIR

_WORD = re.compile(r"[\w'-]+")


def extract_label(text: str, rule: str) -> str:
    """The prediction as the recipe defines it; `first_word`: first word, lowercased."""
    if rule == "first_word":
        match = _WORD.search(text)
        return match.group(0).lower() if match else ""
    raise ValueError(f"unknown extraction rule {rule!r}")


@torch.no_grad()
def generate_greedy(
    model: GPT2LMHeadModel, examples: Sequence[Encoded], *, pad_id: int, eos_id: int, max_new_tokens: int,
    batch_size: int,
) -> list[list[int]]:
    """Batched greedy decoding with left padding and the KV cache; returns new tokens per example."""
    out: list[list[int]] = [[] for _ in examples]
    # Sort by prompt length so batches need little padding; results go back in input order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = collate_prompts_left_padded([examples[i] for i in index], pad_id)
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id
        )
        new = generated[:, batch["input_ids"].shape[1] :]
        for row, i in enumerate(index):
            ids = new[row].tolist()
            out[i] = ids[: ids.index(eos_id)] if eos_id in ids else ids
    return out


@torch.no_grad()
def completion_losses(model: GPT2LMHeadModel, examples: Sequence[Encoded], *, pad_id: int, batch_size: int) -> list[float]:
    """Mean cross-entropy of each example's completion tokens given its prompt."""
    losses = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate_for_training(chunk, pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        token_loss = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )  # [batch, seq-1]
        counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        losses.extend((token_loss.sum(dim=1) / counts).tolist())
    return losses


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


def evaluate(build_dir: Path, checkpoint: Path | None = None) -> dict:
    config = load_runtime_config(build_dir)
    spec: EvalSpec = config.eval
    model_dir = checkpoint or build_dir / MODEL_DIR
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no trained model at {model_dir}; run `recipe run {build_dir}` first")
    torch.manual_seed(config.seed)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    data = config.data[spec.data]
    heldout = read_examples(build_dir / data.heldout)
    train_labels = Counter(e.label for e in read_examples(build_dir / data.train))
    majority = max(sorted(train_labels), key=lambda k: train_labels[k])
    pad_id, eos_id = config.model.pad_token_id, config.model.eos_token_id

    started = time.perf_counter()
    new_tokens = generate_greedy(
        model, heldout, pad_id=pad_id, eos_id=eos_id, max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size
    )
    generation_s = time.perf_counter() - started
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_tokens]
    predicted = [extract_label(t, spec.extract) for t in texts]
    gold = [e.label.lower() for e in heldout]
    report = classification_report(gold, predicted, [l.lower() for l in spec.labels], majority.lower())

    losses = completion_losses(model, heldout, pad_id=pad_id, batch_size=spec.batch_size)
    mean_loss = sum(losses) / len(losses)
    report.update(
        {
            "loss": round(mean_loss, 4),
            "perplexity": round(math.exp(mean_loss), 4),
            "generation_s": round(generation_s, 2),
            "generated_tokens_per_s": round(sum(len(t) for t in new_tokens) / generation_s, 1),
            "samples": [
                {"line": e.line, "prompt": tokenizer.decode(e.prompt), "generated": t, "label": e.label}
                for e, t in list(zip(heldout, texts))[:5]
            ],
        }
    )
    (build_dir / "eval.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    with open(build_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for e, text, p, loss in zip(heldout, texts, predicted, losses):
            record = {"line": e.line, "label": e.label, "generated": text, "predicted": p, "loss": round(loss, 5)}
            f.write(json.dumps(record, sort_keys=True) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.evaluate")
    parser.add_argument("build_dir", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        report = evaluate(args.build_dir, args.checkpoint)
    except (IncompatibleBuildError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"eval: accuracy {report['accuracy']:.4f} (majority baseline {report['majority_baseline']:.4f}), "
        f"macro-F1 {report['macro_f1']:.4f}, completion loss {report['loss']:.4f}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
