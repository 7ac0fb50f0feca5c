"""Token losses from the decoder's final hidden states: the LM head, soft-capping, temperature and
cross-entropy, by `train.cross_entropy`.

  "chunked"  the head applied to LOSS_CHUNK_POSITIONS supervised positions at a time; with more
             than one chunk and gradients on, each chunk's logits are recomputed in backward
             instead of being kept (torch.utils.checkpoint), so at most one chunk's vocabulary
             logits are alive at any moment. torchtune's CEWithChunkedOutputLoss chunks the
             upcast but keeps every chunk's log-softmax for backward, which is the whole batch.
  "full"     the head on every supervised position at once; autograd keeps all their fp32 logits
             until backward.
  "fused"    Liger's fused linear cross-entropy (CUDA, liger-kernel installed): logits never
             materialised at all, the head's gradient computed in forward.

The chunked recomputation costs one more head matmul per supervised token in a step with more
than one chunk (2 x vocab x hidden FLOPs, a third of the head's training cost); a step whose
supervised positions fit in one chunk runs exactly like "full".
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from runtime.contract.config import LOSS_CHUNK_POSITIONS


def head_logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None, temperature: float) -> torch.Tensor:
    """fp32 logits of `hidden` ([n, hidden] -> [n, vocab]): Gemma-2's final soft-capping
    cap * tanh(logits / cap) when the model has one, then divided by the sampling temperature
    (PPO and GRPO score samples as they were drawn)."""
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def token_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, mode: str,
                        softcap: float | None = None, temperature: float = 1.0, chunk: int = LOSS_CHUNK_POSITIONS,
                        agree_chunks: Callable[[int], int] | None = None) -> torch.Tensor:
    """The loss of each supervised position: `hidden` [n, hidden] predicts `targets` [n] -> [n] fp32.

    `agree_chunks` (ZeRO-3) turns this rank's chunk count into every rank's largest: each call of
    the head gathers its sharded weight, a collective, so every rank must call it as often; a rank
    with fewer chunks scores empty ones."""
    def losses(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head_logits(head, h, softcap, temperature), t, reduction="none")

    if mode == "fused":
        return fused_cross_entropy(head, hidden, targets, softcap=softcap, temperature=temperature)
    if mode not in ("chunked", "full"):
        raise ValueError(f"unknown cross_entropy mode {mode!r}")
    chunks = -(-hidden.shape[0] // chunk)
    if mode == "chunked" and agree_chunks is not None:
        chunks = agree_chunks(chunks)
    if mode == "full" or chunks <= 1:
        return losses(hidden, targets)
    pieces = list(zip(hidden.split(chunk), targets.split(chunk)))
    pieces += [(hidden[:0], targets[:0])] * (chunks - len(pieces))
    return torch.cat([_chunk(losses, h, t) for h, t in pieces])


def _chunk(losses: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One chunk's losses; under autograd its logits are recomputed in backward, not saved.
    Non-reentrant checkpointing replays autocast and the random state (a LoRA head's dropout)."""
    if not torch.is_grad_enabled():
        return losses(hidden, targets)
    return checkpoint(losses, hidden, targets, use_reentrant=False)


def fused_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, softcap: float | None,
                        temperature: float) -> torch.Tensor:
    """Liger's fused linear cross-entropy, summed into one value per call.

    Liger computes the head's gradient inside its forward from a scalar upstream gradient, so it
    returns the sum (the language-model loss), not per-token losses; the configuration refuses it
    for the stages that weight tokens differently (runtime.contract.config.unsupported)."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or weight is None:
        raise ValueError(f'cross_entropy = "fused" needs a plain linear LM head, not {type(head).__name__} '
                         '(an adapter on lm_head?); use cross_entropy = "chunked"')
    if temperature != 1.0:
        raise ValueError('cross_entropy = "fused" scores at temperature 1; use cross_entropy = "chunked"')
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=softcap)
    total = loss(weight, hidden.to(weight.dtype), targets, head.bias)
    return total.float().reshape(1)
