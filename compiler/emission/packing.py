"""What `train.packing` makes of a stage's training rows, by the runtime's own rules
(runtime.contract.packing): the packs an epoch batches, and the plan's account of them."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from runtime.contract.packing import PACKED_KINDS, pack_stats, record_length
from runtime.contract.steps import training_items as items_of

if TYPE_CHECKING:
    from compiler.data.prepare import PreparedData
    from compiler.loading.recipe import Stage
    from compiler.loading.spec.stages import TrainSection


def packs(t: TrainSection, stage: Stage) -> bool:
    """Whether a stage (its training section `t`) trains on packs: packing on, and a kind that packs."""
    return bool(t.packing) and stage.kind in PACKED_KINDS


def _lengths(p: PreparedData) -> list[int]:
    return [record_length(json.loads(line)) for line in p.train_jsonl.splitlines() if line.strip()]


def _budget(p: PreparedData, lengths: list[int]) -> int:
    """Tokens per packed row, as the runtime takes it (runtime.core.packing.pack_budget)."""
    return max([p.max_total_tokens, *lengths])


def training_items(packing: bool, p: PreparedData) -> int:
    """What one epoch batches: the training rows, or with packing the packs they make. Data the
    compiler could not tokenize is counted in rows (the runtime refuses to train it)."""
    if not packing or not p.measured:
        return p.n_train
    lengths = _lengths(p)
    return items_of(lengths, _budget(p, lengths), packing=True)


def packing_entry(packing: bool, p: PreparedData) -> dict[str, Any] | None:
    """The plan's `packing` of a stage: the row budget, packs, sequences per pack, padding share."""
    if not packing or not p.measured:
        return None
    lengths = _lengths(p)
    budget = _budget(p, lengths)
    return {"budget": budget, **pack_stats(lengths, budget),
            "why": f"train.packing: {len(lengths)} sequences best-fit into rows of {budget} tokens; a step is "
                   "micro_batch_size rows, and every sequence attends only to itself"}
