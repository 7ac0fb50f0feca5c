"""Parameters, FLOPs and memory: pure functions of frozen inputs.

No file access, clock, environment or device probing here; the compiler gathers the inputs and
these functions only compute. Units are in the names: *_bytes, *_gib, *_flops.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Gpt2Shape:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int


@dataclass(frozen=True)
class ParameterCount:
    total: int
    embedding: int  # token + position embeddings (the LM head is tied to the token embedding)
    per_layer: int
    final_norm: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def gpt2_parameters(shape: Gpt2Shape) -> ParameterCount:
    """Exact parameter count of transformers' GPT2LMHeadModel with tied input/output embeddings."""
    h = shape.n_embd
    embedding = shape.vocab_size * h + shape.n_positions * h  # wte + wpe
    per_layer = (
        2 * h  # ln_1 weight + bias
        + h * 3 * h + 3 * h  # attn.c_attn: fused q, k, v projection
        + h * h + h  # attn.c_proj
        + 2 * h  # ln_2
        + h * 4 * h + 4 * h  # mlp.c_fc
        + 4 * h * h + h  # mlp.c_proj
    )
    final_norm = 2 * h  # ln_f
    total = embedding + shape.n_layer * per_layer + final_norm
    return ParameterCount(total=total, embedding=embedding, per_layer=per_layer, final_norm=final_norm)


def gpt2_train_flops(
    shape: Gpt2Shape, *, tokens: int, supervised_tokens: int, mean_seq_len: float
) -> int:
    """Training FLOPs (forward + backward = 3x forward) for `tokens` real tokens.

    Source: Kaplan et al. 2020 (arXiv:2001.08361), C = 6N per token for the dense layers, plus
    the attention term 12 * n_layer * n_embd * seq_len per token used by nanoGPT's estimate_mfu.
    The LM head (2 * vocab * n_embd per token, x3 for training) is counted only on supervised
    tokens, because the runtime computes logits only where the loss needs them.
    """
    params = gpt2_parameters(shape)
    h, layers = shape.n_embd, shape.n_layer
    body = 6 * params.non_embedding + 12 * layers * h * mean_seq_len  # FLOPs per token
    head = 6 * shape.vocab_size * h  # FLOPs per supervised token
    return int(tokens * body + supervised_tokens * head)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak training memory on one device, in bytes, by category."""

    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    logits_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.gradients_bytes
            + self.optimizer_bytes
            + self.activations_bytes
            + self.logits_bytes
            + self.overhead_bytes
        )

    def as_gib(self) -> dict[str, float]:
        parts = {
            "weights": self.weights_bytes,
            "gradients": self.gradients_bytes,
            "optimizer": self.optimizer_bytes,
            "activations": self.activations_bytes,
            "logits": self.logits_bytes,
            "overhead": self.overhead_bytes,
            "total": self.total_bytes,
        }
        return {k: round(v / GIB, 3) for k, v in parts.items()}


# Bytes per value by training precision. Mixed precision keeps an fp32 master copy of the
# weights next to the half-precision working copy; AdamW keeps two fp32 moments per parameter.
_WEIGHT_BYTES = {"fp32": 4, "bf16": 2 + 4, "fp16": 2 + 4}
_GRAD_BYTES = {"fp32": 4, "bf16": 4, "fp16": 4}
_ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_ADAMW_BYTES = 8
# CUDA context plus allocator slack; measured figures vary by driver (300-900 MiB on recent GPUs).
_CUDA_OVERHEAD_BYTES = 768 * 1024**2


def gpt2_train_memory(
    shape: Gpt2Shape,
    *,
    micro_batch_size: int,
    seq_len: int,
    supervised_per_example: int,
    precision: str,
    device: str,
    attention: str = "sdpa",
) -> MemoryEstimate:
    """Peak memory of one AdamW training step, without sharding or recomputation.

    Activations per layer follow Korthikanti et al. 2022 (arXiv:2205.05198, eq. 2):
    s*b*h*(34 + 5*a*s/h) bytes with 2-byte activations; the 5*a*s/h term (attention scores,
    softmax and its dropout mask) is not stored by fused SDPA kernels. Scaled by the activation
    width for fp32. Logits: the runtime projects only supervised positions to the vocabulary,
    holding logits, their softmax and gradient (3 fp32 copies).
    """
    n = gpt2_parameters(shape).total
    s, b, h, a = seq_len, micro_batch_size, shape.n_embd, shape.n_head
    per_layer_16bit = s * b * h * 34 + (5 * a * s * s * b if attention == "eager" else 0)
    activations = shape.n_layer * per_layer_16bit * _ACTIVATION_BYTES[precision] // 2
    activations += 2 * s * b * h * 4  # embeddings output and final norm, fp32
    logits = 3 * b * supervised_per_example * shape.vocab_size * 4
    return MemoryEstimate(
        weights_bytes=n * _WEIGHT_BYTES[precision],
        gradients_bytes=n * _GRAD_BYTES[precision],
        optimizer_bytes=n * _ADAMW_BYTES,
        activations_bytes=activations,
        logits_bytes=logits,
        overhead_bytes=_CUDA_OVERHEAD_BYTES if device == "cuda" else 0,
    )
