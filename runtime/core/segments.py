"""Attention over packed rows one sequence at a time, for sdpa and eager.

transformers reads restarting position ids as packed sequences (runtime.core.packing) and, with
sdpa or eager, builds one block-diagonal causal mask over the whole row; the kernel then computes
every query of the row against every key and throws the cross-sequence scores away, so attention
costs the square of the row's length and SDPA takes its masked path. A row of ten 140-token
conversations pays 1,400^2 instead of 10 x 140^2. Here each sequence's block of the row runs as an
attention of its own, under its own block of that same mask, so sliding windows and whatever else
the model puts in its mask stay exactly as transformers makes them: the cost is the sum of the
squares of the sequence lengths, what unpacked rows pay and what the plan prices.
flash_attention_2 needs none of this (its variable-length kernels read the position ids).

The two implementations are registered with transformers' AttentionInterface under their own
names and keep sdpa's and eager's mask functions. The loss passes `packed_segments` (the
sequences of each row) through the model's keyword arguments, which reach every attention call,
also when gradient checkpointing recomputes a layer; a call without them (held-out loss over
padded rows, generation, a vision tower) runs plain sdpa or eager.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

# (row, start, end) of every sequence of a batch of packed rows
Segments = tuple[tuple[int, int, int], ...]

# the implementation a packed stage switches to, by the one the build asks for
SEGMENTED = {"sdpa": "sdpa_per_sequence", "eager": "eager_per_sequence"}


def segments_of(position_ids: torch.Tensor) -> Segments:
    """The sequences of each row: one starts wherever a position does not follow the one before it
    (transformers' own rule, `masking_utils.find_packed_sequence_indices`), and runs to the next."""
    positions = position_ids.detach().cpu()
    starts = torch.ones(positions.shape, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    width = positions.shape[1]
    by_row: dict[int, list[int]] = {}
    for row, column in starts.nonzero().tolist():
        by_row.setdefault(row, []).append(column)
    return tuple((row, start, end) for row, columns in sorted(by_row.items())
                 for start, end in zip(columns, [*columns[1:], width]))


def _module_eager(module: nn.Module) -> Callable:
    """The eager attention of the model that `module` belongs to: each transformers model file
    defines its own (Gemma-2's soft-caps the scores, for one)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _per_sequence(base: Callable[[nn.Module], Callable]) -> Callable:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, packed_segments: Segments | None = None, **kwargs):
        forward = base(module)
        if packed_segments is None or key.shape[2] != query.shape[2]:
            return forward(module, query, key, value, attention_mask, **kwargs)
        sdpa = forward is sdpa_attention_forward
        causal = _causal_blocks(attention_mask, packed_segments) if sdpa else None
        # One split per row and tensor, not a slice per sequence: the backward of a slice builds a
        # zero tensor of the whole input for every sequence, the backward of a split one concatenation.
        sizes: list[list[int]] = [[] for _ in range(query.shape[0])]
        for row, start, end in packed_segments:
            sizes[row].append(end - start)
        if any(sum(n) != query.shape[2] for n in sizes):
            raise ValueError("packed_segments must cover every row, in order (runtime.core.segments.segments_of)")
        pieces = [[q.split(n, dim=2), k.split(n, dim=2), v.split(n, dim=2)]
                  for q, k, v, n in zip(query.split(1), key.split(1), value.split(1), sizes)]
        rows: list[list[torch.Tensor]] = [[] for _ in range(query.shape[0])]
        at = [0] * query.shape[0]
        for i, (row, start, end) in enumerate(packed_segments):
            block = slice(start, end)
            if attention_mask is None:
                mask = None if sdpa else _causal_mask(end - start, query)
            elif sdpa and causal[i]:
                mask = None  # SDPA's causal kernel: no float copy of the mask kept for backward
            else:
                mask = attention_mask[row : row + 1, :, block, block]
            j, at[row] = at[row], at[row] + 1
            q, k, v = (split[j] for split in pieces[row])
            out, _ = forward(module, q, k, v, mask, **kwargs)
            rows[row].append(out)  # [1, tokens, heads, head_dim]
        return torch.cat([torch.cat(outs, dim=1) for outs in rows], dim=0), None

    return attention


def _causal_blocks(mask: torch.Tensor | None, segments: Segments) -> list[bool]:
    """For each sequence, whether its block of a boolean [rows, 1, s, s] mask is plain causal, so
    that SDPA may run it with `is_causal` instead of the mask: true unless a sliding window shorter
    than the sequence (or any other pattern) removes keys. Computed once a forward for each mask
    (layers of one kind share it) and kept on the mask tensor."""
    if mask is None or mask.dtype != torch.bool:
        return [False] * len(segments)
    known = getattr(mask, "_causal_blocks", None)
    if known is not None and known[0] == segments:
        return known[1]
    rows, width = mask.shape[0], mask.shape[-1]
    index = torch.empty((rows, width), dtype=torch.long)
    for i, (row, start, end) in enumerate(segments):
        index[row, start:end] = i
    index = index.to(mask.device)
    same = index[:, :, None] == index[:, None, :]  # [rows, s, s]: query and key in one sequence
    causal = torch.ones((width, width), dtype=torch.bool, device=mask.device).tril()
    differs = ((mask[:, 0] != causal) & same).any(dim=-1)  # [rows, s]: a query whose keys are not causal
    counts = torch.zeros(len(segments), dtype=torch.long, device=mask.device)
    counts = counts.index_add(0, index.flatten(), differs.flatten().long())  # such queries, by sequence
    result = [n == 0 for n in counts.tolist()]
    mask._causal_blocks = (segments, result)
    return result


def _causal_mask(length: int, like: torch.Tensor) -> torch.Tensor:
    """eager's additive causal mask for one sequence: 0 on and below the diagonal, the dtype's minimum above."""
    full = torch.full((length, length), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
    return full.triu(1)[None, None]


AttentionInterface.register(SEGMENTED["sdpa"], _per_sequence(lambda module: sdpa_attention_forward))
AttentionInterface.register(SEGMENTED["eager"], _per_sequence(_module_eager))
AttentionMaskInterface.register(SEGMENTED["sdpa"], sdpa_mask)
AttentionMaskInterface.register(SEGMENTED["eager"], eager_mask)


def use_per_sequence(model: nn.Module) -> bool:
    """Switch `model` (a transformers model, not a peft wrapper) from sdpa or eager to attention
    per packed sequence; whether it now runs it. flash_attention_2 and models whose files
    transformers does not define an eager attention for keep their own. The implementation is
    the runtime's only: `config.json` does not record it, and a saved model loads as before."""
    current = model.config._attn_implementation
    if current not in SEGMENTED:
        return current in SEGMENTED.values()
    if current == "eager" and (getattr(model.config, "reorder_and_upcast_attn", False)
                               or not hasattr(sys.modules[type(model).__module__], "eager_attention_forward")):
        return False
    model.config._attn_implementation = SEGMENTED[current]
    return True


def runs_per_sequence(model: nn.Module) -> bool:
    return model.config._attn_implementation in SEGMENTED.values()
