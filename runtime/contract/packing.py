"""Packing: several training sequences in one row of at most `budget` tokens.

The compiler counts a packed stage's steps from the packs this module forms and the runtime trains
on the same packs, so both must form them alike: the packs depend only on the sequence lengths and
the budget (best-fit decreasing, ties broken by position), never on a random seed. Every epoch
trains the same packs, in the epoch's own order.
"""

from __future__ import annotations

import bisect
from typing import Any, Mapping, Sequence

PACKED_KINDS = ("pretrain", "sft")  # the stage kinds that pack; the others compare or score whole rows


def record_length(record: Mapping[str, Any]) -> int:
    """Tokens of one record of a build's training file: its `input_ids` (chat data) or its prompt
    and completion."""
    if "input_ids" in record:
        return len(record["input_ids"])
    return len(record["prompt"]) + len(record["completion"])


def pack(lengths: Sequence[int], budget: int) -> list[tuple[int, ...]]:
    """The indices of `lengths` grouped into packs of at most `budget` tokens (a sequence longer
    than the budget gets a pack of its own). Each sequence goes, longest first, into the open pack
    it fills best; a pack lists its sequences in the order they were placed."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, pack index), ascending
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            left, p = free.pop(at)
            packs[p].append(i)
            bisect.insort(free, (left - n, p))
        else:
            packs.append([i])
            if budget - n > 0:
                bisect.insort(free, (budget - n, len(packs) - 1))
    return [tuple(p) for p in packs]


def pack_stats(lengths: Sequence[int], budget: int) -> dict[str, float | int]:
    """What packing `lengths` into rows of `budget` tokens gives: the packs, sequences per pack and
    the share of the packs' token slots (budget x packs) left as padding."""
    packs = pack(lengths, budget)
    slots = budget * len(packs)
    return {"packs": len(packs), "sequences": len(lengths),
            "sequences_per_pack": round(len(lengths) / max(1, len(packs)), 3),
            "padding_share": round(1 - sum(lengths) / slots, 4) if slots else 0.0}
