"""Packed training rows: several sequences in one row, each attending only to itself.

A pack concatenates its sequences; `position_ids` restart at 0 with each one, and no attention
mask is passed. Transformers reads such position ids as packed sequences: with flash_attention_2
it runs the variable-length kernels over them, with sdpa and eager it builds a block-diagonal
causal mask (`masking_utils.find_packed_sequence_indices`), under which runtime.core.segments
computes each sequence's attention on its own. The padding after the last sequence
is a block of its own, never supervised. The first label of every sequence is dropped, so that no
sequence's last position learns to predict the next sequence's first token: exactly the tokens the
unpacked rows supervise are supervised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from runtime.contract.config import DataSpec, RuntimeConfig, StageSpec
from runtime.contract.packing import PACKED_KINDS, pack, pack_stats, record_length
from runtime.contract.steps import training_items as items_of
from runtime.core.data import IGNORE_INDEX, TrainRow, count_rows


@dataclass(frozen=True)
class PackedRow:
    """The sequences of one pack, in the order the row holds them."""

    members: tuple[TrainRow, ...]

    def __len__(self) -> int:  # for length grouping: the tokens of the row
        return sum(len(m) for m in self.members)


def pack_budget(data: DataSpec, lengths: Sequence[int]) -> int:
    """Tokens per packed row: the data set's sequence budget (no sequence is longer after the
    compiler's truncation; a longer one would get a row of its own)."""
    return max([data.max_total_tokens, *lengths])


def pack_rows(rows: Sequence[TrainRow], budget: int) -> list[PackedRow]:
    return [PackedRow(tuple(rows[i] for i in members)) for members in pack([len(r) for r in rows], budget)]


def file_lengths(path: Path) -> list[int]:
    """The length of every sequence in one of the build's training files."""
    with open(path, encoding="utf-8") as f:
        return [record_length(json.loads(raw)) for raw in f]


def training_items(build_dir: Path, config: RuntimeConfig, stage: StageSpec) -> int:
    """What one epoch of `stage` batches: its training rows, or the packs they make."""
    data = config.data[stage.data]
    path = build_dir / data.train
    if not stage.packing or stage.kind not in PACKED_KINDS:
        return count_rows(path)
    lengths = file_lengths(path)
    return items_of(lengths, pack_budget(data, lengths), packing=True)


def packing_report(rows: Sequence[TrainRow], budget: int) -> dict:
    """For the run report: the budget, the packs, sequences per pack, the padding share."""
    return {"budget": budget, **pack_stats([len(r) for r in rows], budget)}


def collate_packed(packs: Sequence[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Packs right-padded to the longest: input ids, restarting position ids, labels, and the mask
    of real tokens (`attention_mask`, counted by the loop; the loss does not pass it to the model)."""
    width = max(len(p) for p in packs)
    input_ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(packs), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(packs), width), dtype=torch.long)
    position_ids = torch.zeros((len(packs), width), dtype=torch.long)
    for i, p in enumerate(packs):
        at = 0
        for m in p.members:
            n = len(m)
            input_ids[i, at : at + n] = torch.tensor(m.input_ids)
            labels[i, at + 1 : at + n] = torch.tensor(m.labels[1:])
            position_ids[i, at : at + n] = torch.arange(n)
            at += n
        attention_mask[i, :at] = 1
        position_ids[i, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}
