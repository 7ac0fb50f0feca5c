"""Predictions by the recipe's extraction rule: greedy generation after the prompt, the label read
from it (`first_word`), or the most likely label of the label set (`label_set`). The final eval
(runtime/evaluate.py) and the held-out accuracy during training (runtime/core/evaluation.py) both
predict through `predict_labels`, so the two measure the same thing.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from transformers import PreTrainedModel

from runtime.contract.config import EvalSpec, RuntimeConfig, TemplateSpec
from runtime.core.data import Encoded, collate_for_training, collate_prompts_left_padded
from runtime.core.losses import TokenLoss

_WORD = re.compile(r"[\w'-]+")


def extract_label(text: str, rule: str) -> str:
    """The prediction as the recipe defines it; `first_word`: first word, lowercased."""
    if rule == "first_word":
        match = _WORD.search(text)
        return match.group(0).lower() if match else ""
    raise ValueError(f"unknown extraction rule {rule!r}")


def on_device(batch: dict[str, torch.Tensor], model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """`batch` where the model's weights are: a GPU during training, the CPU in `recipe eval`."""
    return {key: value.to(model.device) for key, value in batch.items()}


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel, examples: Sequence[Encoded], *, pad_id: int, eos_id: int, max_new_tokens: int,
    batch_size: int,
) -> list[list[int]]:
    """Batched greedy decoding with left padding and the KV cache; returns new tokens per example."""
    out: list[list[int]] = [[] for _ in examples]
    # Sort by prompt length so batches need little padding; results go back in input order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = on_device(collate_prompts_left_padded([examples[i] for i in index], pad_id), model)
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id
        )
        new = generated[:, batch["input_ids"].shape[1] :]
        for row, i in enumerate(index):
            ids = new[row].tolist()
            out[i] = ids[: ids.index(eos_id)] if eos_id in ids else ids
    return out


@torch.no_grad()
def completion_losses(model: PreTrainedModel, examples: Sequence[Encoded], *, pad_id: int, batch_size: int) -> list[float]:
    """Mean cross-entropy of each example's completion tokens given its prompt (the LM head only at
    the completion's positions, as in training)."""
    loss_fn = TokenLoss(model)
    losses = []
    for start in range(0, len(examples), batch_size):
        batch = on_device(collate_for_training(examples[start : start + batch_size], pad_id), model)
        sums, counts = loss_fn.per_row(**batch)
        losses.extend((sums / counts.clamp(min=1)).tolist())
    return losses


def label_token_sequences(template: TemplateSpec, label_field: str | None, labels: Sequence[str],
                          tokenizer) -> dict[str, list[int]]:
    """Each label's completion as training saw it: the completion template rendered with the label."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    source = template.completion or " {{ label }}"
    out = {}
    for label in labels:
        text = env.from_string(source).render({label_field or "label": label})
        out[label] = tokenizer.encode(text, add_special_tokens=False)
    return out


@torch.no_grad()
def predict_from_label_set(model: PreTrainedModel, examples: Sequence[Encoded], candidates: dict[str, list[int]], *,
                           pad_id: int, batch_size: int) -> list[str]:
    """The label whose completion tokens are most likely after each prompt (summed log-probability):
    the answer constrained to the label set, whatever the model would have generated."""
    scores: dict[str, list[float]] = {}
    for label, ids in candidates.items():
        rows = [Encoded(e.prompt, tuple(ids), e.label, e.line) for e in examples]
        scores[label] = [-loss * len(ids) for loss in completion_losses(model, rows, pad_id=pad_id,
                                                                         batch_size=batch_size)]
    names = list(candidates)
    return [max(names, key=lambda n: scores[n][i]) for i in range(len(examples))]


def predict_labels(model: PreTrainedModel, tokenizer, config: RuntimeConfig, examples: Sequence[Encoded]
                   ) -> tuple[list[str], list[str], list[list[int]]]:
    """(predicted labels, generated texts, generated ids) by the recipe's extraction rule."""
    spec: EvalSpec = config.eval
    pad_id, eos_id = config.model.pad_token_id, config.model.eos_token_id
    new_tokens = generate_greedy(model, examples, pad_id=pad_id, eos_id=eos_id, max_new_tokens=spec.max_new_tokens,
                                 batch_size=spec.batch_size)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_tokens]
    if spec.extract == "label_set":
        template = config.data[spec.data].template
        candidates = label_token_sequences(template, spec.label_field, spec.labels, tokenizer)
        predicted = [p.lower() for p in predict_from_label_set(model, examples, candidates, pad_id=pad_id,
                                                                batch_size=spec.batch_size)]
    else:
        predicted = [extract_label(t, spec.extract) for t in texts]
    return predicted, texts, new_tokens
