"""Pre-tokenized examples from the build, batched without wasted padding."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from runtime.contract.config import IncompatibleBuildError

IGNORE_INDEX = -100  # label value cross-entropy skips: prompt and padding positions


@dataclass(frozen=True)
class Encoded:
    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    label: str
    line: int

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)


@dataclass(frozen=True)
class TrainRow:
    """One training sequence: token ids and their labels (IGNORE_INDEX where nothing is supervised)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    line: int

    def __len__(self) -> int:
        return len(self.input_ids)


def read_training_rows(path: Path, *, supervise_prompt: bool = False) -> list[TrainRow]:
    """The build's training file as sequences with labels.

    Prompt/completion records supervise the completion (and the prompt too with
    `supervise_prompt`, for `loss = "all"` and pretraining); chat records carry their own labels,
    computed at compile time from the chat template and the template's `loss` setting."""
    out = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            record = json.loads(raw)
            if "input_ids" in record:
                ids, labels = tuple(record["input_ids"]), tuple(record["labels"])
            else:
                prompt, completion = tuple(record["prompt"]), tuple(record["completion"])
                ids = prompt + completion
                labels = ids if supervise_prompt else (IGNORE_INDEX,) * len(prompt) + completion
            out.append(TrainRow(ids, labels, record["line"]))
    return out


def count_rows(path: Path) -> int:
    """Records in one of the build's JSONL files (one a line), without parsing them."""
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def collate_rows(rows: Sequence[TrainRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (padding is never supervised)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        input_ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def read_examples(path: Path) -> list[Encoded]:
    out = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            record = json.loads(raw)
            out.append(Encoded(tuple(record["prompt"]), tuple(record["completion"]), record["label"], record["line"]))
    return out


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, *, group: bool = True, megabatch: int = 50
) -> list[list[int]]:
    """Shuffle, then sort by length inside windows of `megabatch` batches so that each batch holds
    examples of similar length (little padding) while the order stays random across epochs.
    The batch order is shuffled too, so long batches are not all at the end of an epoch."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group:
        window = batch_size * megabatch
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda j: lengths[j], reverse=True)
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate_for_training(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels that supervise only the completion."""
    rows = [TrainRow(e.prompt + e.completion, (IGNORE_INDEX,) * len(e.prompt) + e.completion, e.line) for e in examples]
    return collate_rows(rows, pad_id)


def collate_prompts_left_padded(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts only, padded on the left so every row's next token is generated at the same column."""
    width = max(len(e.prompt) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, width - len(e.prompt) :] = torch.tensor(e.prompt)
        attention_mask[row, width - len(e.prompt) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ---------------------------------------------------------------------------------------------
# preference pairs and scored rows (reward and dpo stages)


@dataclass(frozen=True)
class PairRow:
    """A preference pair: the same prompt with the chosen and the rejected completion."""

    chosen: TrainRow
    rejected: TrainRow
    line: int

    def __len__(self) -> int:  # for length grouping: the longer of the two sequences
        return max(len(self.chosen), len(self.rejected))


@dataclass(frozen=True)
class ScoredRow:
    """A prompt and completion with the numeric score a regression reward model learns."""

    row: TrainRow
    score: float

    def __len__(self) -> int:
        return len(self.row)


def _completion_row(prompt: Sequence[int], completion: Sequence[int], line: int) -> TrainRow:
    ids = tuple(prompt) + tuple(completion)
    return TrainRow(ids, (IGNORE_INDEX,) * len(prompt) + tuple(completion), line)


def read_pairs(path: Path) -> list[PairRow]:
    """Preference records ({prompt, completion, rejected, rejected_prompt}) as pairs of sequences
    that supervise only their completions."""
    out = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            record = json.loads(raw)
            if "rejected" not in record:
                raise IncompatibleBuildError(f"{path}: line {record.get('line')} has no rejected completion; "
                                 "the data set is not preference data (recompile the recipe)")
            chosen = _completion_row(record["prompt"], record["completion"], record["line"])
            rejected = _completion_row(record.get("rejected_prompt", record["prompt"]), record["rejected"], record["line"])
            out.append(PairRow(chosen, rejected, record["line"]))
    return out


def read_scored(path: Path) -> list[ScoredRow]:
    """Records with a `score` (written at compile time from the stage's score_field)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            record = json.loads(raw)
            if "score" not in record:
                raise IncompatibleBuildError(f"{path}: line {record.get('line')} has no score; recompile the recipe")
            out.append(ScoredRow(_completion_row(record["prompt"], record["completion"], record["line"]),
                                 float(record["score"])))
    return out


def read_prompts(path: Path) -> list[tuple[int, ...]]:
    """The prompt token ids of every record (what a policy is asked to continue)."""
    with open(path, encoding="utf-8") as f:
        return [tuple(json.loads(raw)["prompt"]) for raw in f]


def collate_pairs(pairs: Sequence[PairRow], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B sequences: the B chosen rows, then the B rejected rows."""
    return collate_rows([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def collate_scored(rows: Sequence[ScoredRow], pad_id: int) -> dict[str, torch.Tensor]:
    batch = collate_rows([r.row for r in rows], pad_id)
    batch["scores"] = torch.tensor([r.score for r in rows], dtype=torch.float32)
    return batch
