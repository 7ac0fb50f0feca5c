"""What attention keeps for backward beyond q, k, v and its output: the terms that grow with the
square of the sequence, and the soft-capping of logits.

How transformers (5.x) computes attention in training, which these terms follow:

- eager (`eager_attention_forward`): the scores of every query against every key, [heads, s, s]
  per sequence, in every layer. A sliding-window layer computes the same full product and masks
  the keys outside its window by adding the mask, so its scores are s x s too: the window saves
  no memory here. Saved for backward: the softmax, computed in fp32, and its copy at the working
  width that the product with V keeps (one tensor when the working width is fp32); attention-logit
  soft-capping (`tanh(scores / cap) * cap`, Gemma-2) keeps tanh's output as well.
- sdpa: the fused kernel saves no scores. A causal layer passes no mask (SDPA's causal kernel),
  but a sliding-window layer whose sequence reaches its window needs one: transformers builds a
  [batch, 1, s, s] mask and torch's scaled_dot_product_attention turns it into a float mask at the
  working width in each call, which the kernel keeps for backward, once per sliding-window layer.
  SDPA cannot soft-cap scores, so transformers refuses it for Gemma-2 (compile says so).
- flash_attention_2: windows and soft-capping are computed inside the kernel; nothing of size s x s.

Packed rows (train.packing) attend one sequence at a time under sdpa and eager
(runtime.core.segments), so each sequence keeps the terms of its own length; the plan prices a
row at the row's length, which bounds them.

Final-logit soft-capping (Gemma-2's `final_logit_softcapping`) passes the logits through tanh,
which keeps its output: one more logits-sized tensor at the width the loss computes in.
Standard library only, pure functions of the config's facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FP32_BYTES = 4
# Gemma2Config's defaults, for a config.json that leaves the soft-capping out (an explicit null
# switches it off)
_SOFTCAP_DEFAULTS = {"gemma2": (50.0, 30.0)}


@dataclass(frozen=True)
class AttentionFacts:
    """The attention facts of a config.json that change memory."""

    sliding_window: int = 0  # keys a local layer attends to (0: no sliding-window layers)
    local_layers: int = 0  # layers that attend within the window
    attn_softcap: float | None = None  # attn_logit_softcapping
    final_softcap: float | None = None  # final_logit_softcapping


def attention_facts(config: dict[str, Any], family: str, layers: int) -> AttentionFacts:
    """Sliding-window layers and soft-capping as transformers' config classes derive them."""
    window = config.get("sliding_window") or 0
    local = _local_layers(config, family, layers) if window else 0
    attn_cap, final_cap = _SOFTCAP_DEFAULTS.get(family, (None, None))
    return AttentionFacts(sliding_window=int(window) if local else 0, local_layers=local,
                          attn_softcap=config.get("attn_logit_softcapping", attn_cap),
                          final_softcap=config.get("final_logit_softcapping", final_cap))


def _local_layers(config: dict[str, Any], family: str, layers: int) -> int:
    """How many layers attend within the window: an explicit `layer_types`, else each config
    class's own rule (Gemma2Config, Gemma3TextConfig, Qwen2Config and the others' __post_init__)."""
    if config.get("layer_types"):
        return sum(1 for kind in config["layer_types"] if kind == "sliding_attention")
    if family == "gemma2":  # every other layer, starting with the first
        return sum(1 for i in range(layers) if (i + 1) % 2)
    if family == "gemma3_text":  # five of every six by default
        pattern = int(config.get("sliding_window_pattern", 6))
        return sum(1 for i in range(layers) if (i + 1) % pattern)
    if family in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe") and not config.get("use_sliding_window", False):
        return 0  # their configs carry a sliding_window that applies only with use_sliding_window
    start = int(config.get("max_window_layers", layers))
    if family in ("qwen2", "qwen3"):  # the layers from max_window_layers on
        return max(0, layers - start)
    if family == "qwen2_moe":  # every other layer below max_window_layers
        return sum(1 for i in range(min(start, layers)) if (i + 1) % 2)
    return layers  # Mistral, Mixtral, Phi-3, Qwen3-MoE and the rest: the window applies to every layer


def attention_bytes(att: AttentionFacts, *, layers: int, heads: int, seq_len: int, sequences: int,
                    implementation: str, working_bytes: int, checkpointed: bool = False) -> int:
    """Bytes the attention of `sequences` sequences of `seq_len` tokens keeps for backward beyond
    q, k, v and its output, over all layers (or, with gradient checkpointing, the one layer being
    recomputed: the largest)."""
    global_layers = layers - att.local_layers
    per_layer = {
        "global": layer_bytes(att, local=False, heads=heads, seq_len=seq_len, implementation=implementation,
                              working_bytes=working_bytes),
        "local": layer_bytes(att, local=True, heads=heads, seq_len=seq_len, implementation=implementation,
                             working_bytes=working_bytes),
    }
    if checkpointed:
        used = [per_layer[k] for k, n in (("global", global_layers), ("local", att.local_layers)) if n]
        return sequences * max(used, default=0)
    return sequences * (global_layers * per_layer["global"] + att.local_layers * per_layer["local"])


def layer_bytes(att: AttentionFacts, *, local: bool, heads: int, seq_len: int, implementation: str,
                working_bytes: int) -> int:
    """One sequence, one layer: eager's scores ([heads, s, s], local layers included), or sdpa's
    float mask ([1, s, s]) in a sliding-window layer whose sequence reaches the window."""
    scores = seq_len * seq_len
    if implementation == "eager":
        kept = FP32_BYTES + (working_bytes if working_bytes != FP32_BYTES else 0)  # softmax in fp32, its copy
        if att.attn_softcap:
            kept += working_bytes  # tanh's output
        return heads * scores * kept
    if implementation == "sdpa" and local and seq_len >= att.sliding_window:
        return scores * working_bytes
    return 0


def final_softcap_bytes_per_logit(att: AttentionFacts, loss_width_bytes: int) -> int:
    """Extra bytes per logit when the logits are soft-capped: tanh's saved output."""
    return loss_width_bytes if att.final_softcap else 0
