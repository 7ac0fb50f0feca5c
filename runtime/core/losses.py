"""The modules a stage's loss is built on: token log-probabilities and a scalar head.

`TokenLoss` scores the supervised tokens of a causal language model (the training loss of
pretrain and sft, the log-probabilities of DPO and PPO); `ScalarHead` reads a sequence-
classification model as one reward per sequence or one value per position (reward models, critics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from runtime.contract.config import LOSS_CHUNK_POSITIONS
from runtime.core.cross_entropy import token_cross_entropy
from runtime.core.data import IGNORE_INDEX
from runtime.core.model import hf_model
from runtime.core.segments import runs_per_sequence, segments_of


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row is its real tokens followed only by padding ([batch, seq] of 1 then 0)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


class TokenLoss(nn.Module):
    """Cross-entropy on supervised positions only, returned as (sum of token losses, token count).

    The LM head (hidden x vocab, by far the largest matmul for small models) is applied only to
    the hidden states whose next token is supervised, instead of to every position: for a
    one-token label that is 1 row per example instead of ~50; `cross_entropy` says how the head
    and the loss meet (runtime.core.cross_entropy: in chunks by default). Prefix tuning's trained
    key/value prefixes are passed to the decoder as its past, exactly as peft's own forward does."""

    def __init__(self, model: nn.Module, temperature: float = 1.0, cross_entropy: str = "chunked"):
        super().__init__()
        self.model = model
        self.temperature = temperature  # logits are divided by it (PPO scores samples as they were drawn)
        self.cross_entropy = cross_entropy
        self.chunk_positions = LOSS_CHUNK_POSITIONS
        # ZeRO-3 sets it: the chunk count every rank agrees on (runtime.core.cross_entropy)
        self.agree_chunks: Callable[[int], int] | None = None
        inner = hf_model(model)
        # A tuple, not attributes: registering them as submodules would list every weight twice.
        self._parts = (inner.base_model, inner.get_output_embeddings())
        self._inner = (inner,)
        # Gemma-2's tanh soft-capping of the logits, which the model's own forward applies after the
        # head: applied here too, since this loss calls the head itself (cap * tanh(logits / cap)).
        self.softcap = getattr(inner.config.get_text_config(), "final_logit_softcapping", None)
        config = getattr(model, "active_peft_config", None)
        self._prefix = config.num_virtual_tokens if config is not None and config.is_prompt_learning else 0

    @contextlib.contextmanager
    def adapter_off(self) -> Iterator[TokenLoss]:
        """This loss on the weights under the adapter: peft's adapter switched off and no virtual
        tokens. A reference that shares the policy's weights costs no memory."""
        prefix, self._prefix = self._prefix, 0
        try:
            with self.model.disable_adapter():
                yield self
        finally:
            self._prefix = prefix

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        token_losses, supervised = self.token_losses(input_ids, attention_mask, labels, position_ids)
        return token_losses.sum(), supervised.sum()

    def per_row(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, supervised token count) for each row of the batch."""
        token_losses, supervised = self.token_losses(input_ids, attention_mask, labels)
        rows = supervised.nonzero()[:, 0]
        sums = torch.zeros(input_ids.shape[0], dtype=token_losses.dtype, device=token_losses.device)
        return sums.index_add(0, rows, token_losses), supervised.sum(dim=1)

    def token_losses(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of every supervised token (row-major order) and the [batch, seq-1] supervision mask.

        With `position_ids` the rows are packs (runtime.core.packing): the position ids delimit
        the sequences and no attention mask is passed, so each sequence attends only to itself;
        under attention per sequence (runtime.core.segments) each one is also computed alone."""
        kwargs: dict = {"use_cache": False}
        if position_ids is not None:
            if self._prefix:
                raise ValueError("packed rows cannot carry prefix tuning's virtual tokens")
            kwargs["position_ids"] = position_ids
            if runs_per_sequence(self._inner[0]):
                kwargs["packed_segments"] = segments_of(position_ids)
            attention_mask = None
        if self._prefix:
            batch = input_ids.shape[0]
            prefix_mask = attention_mask.new_ones(batch, self._prefix)
            attention_mask = torch.cat([prefix_mask, attention_mask], dim=1)
            kwargs = {"past_key_values": self.model.get_prompt(batch, max_cache_len=input_ids.shape[1] + self._prefix)}
        elif attention_mask is not None and right_padded(attention_mask):
            # Causal attention never lets a real token see the padding after it, so the mask changes
            # nothing the loss reads. Without it SDPA takes its causal kernel instead of building a
            # [batch, 1, seq, seq] float mask in every layer and keeping it for backward (0.95 GiB for
            # SmolLM2's 30 layers at 4 x 1,407 tokens).
            attention_mask = None
        body, head = self._parts
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = hidden.last_hidden_state
        targets = labels[:, 1:]  # position t predicts token t+1
        supervised = targets != IGNORE_INDEX  # [batch, seq-1]
        selected = hidden[:, :-1][supervised]  # [n_supervised, hidden]
        losses = token_cross_entropy(head, selected, targets[supervised], mode=self.cross_entropy,
                                     softcap=self.softcap, temperature=self.temperature, chunk=self.chunk_positions,
                                     agree_chunks=self.agree_chunks)
        return losses, supervised


class ScalarHead(nn.Module):
    """A sequence-classification model read as rewards (one per sequence) or values (one per position)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        inner = hf_model(model)
        # A tuple, not attributes: registering them as submodules would list every weight twice.
        self._parts = (inner.base_model, inner.score)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """The head at every position: [batch, seq]."""
        body, head = self._parts
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
        return head(hidden).squeeze(-1).float()

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head at each row's last real token (right padding): [batch]."""
        body, head = self._parts
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(dim=1) - 1  # [batch]
        return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1).float()
