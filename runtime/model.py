"""Model construction and the completion-only loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from runtime.config import ModelSpec
from runtime.data import IGNORE_INDEX


def build_model(spec: ModelSpec) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 of the planned shape (transformers' own implementation)."""
    c = spec.config
    config = GPT2Config(
        vocab_size=spec.vocab_size,
        n_positions=spec.n_positions,
        n_embd=c["n_embd"],
        n_layer=c["n_layer"],
        n_head=c["n_head"],
        resid_pdrop=c["resid_pdrop"],
        embd_pdrop=c["embd_pdrop"],
        attn_pdrop=c["attn_pdrop"],
        bos_token_id=spec.eos_token_id,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


class CompletionLoss(nn.Module):
    """Cross-entropy on supervised positions only.

    The LM head (n_embd x vocab, by far the largest matmul for small models) is applied only to
    the hidden states whose next token is supervised, instead of to every position: for a
    one-token label that is 1 row per example instead of ~50.
    """

    def __init__(self, model: GPT2LMHeadModel):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (sum of token losses, number of supervised tokens)."""
        hidden = self.model.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]  # position t predicts token t+1
        supervised = targets != IGNORE_INDEX  # [batch, seq-1]
        selected = hidden[:, :-1][supervised]  # [n_supervised, n_embd]
        logits = self.model.lm_head(selected).float()  # [n_supervised, vocab]
        loss_sum = F.cross_entropy(logits, targets[supervised], reduction="sum")
        return loss_sum, supervised.sum()
