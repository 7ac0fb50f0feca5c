"""Parameters, FLOPs and memory: pure functions of frozen inputs.

No file access, clock, environment or device probing here; the compiler gathers the inputs and
these functions only compute. Units are in the names: *_bytes, *_gib, *_flops.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.params import Architecture

GIB = 1024**3


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
# trainable weights next to the half-precision working copy.
_WORKING_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_MASTER_BYTES = {"fp32": 0, "bf16": 4, "fp16": 4}
_GRAD_BYTES = {"fp32": 4, "bf16": 4, "fp16": 4}
_QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 0.5}  # frozen base weights under bitsandbytes
# Optimizer state per trainable parameter: AdamW two fp32 moments; 8-bit AdamW two int8 moments
# (plus small block scales); SGD one fp32 momentum buffer. Adafactor's factored second moment is
# O(rows + cols) per matrix: counted as one fp32 value per hidden-width row, i.e. 4 / hidden.
_OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "sgd": 4}
# CUDA context plus allocator slack; measured figures vary by driver (300-900 MiB on recent GPUs).
_CUDA_OVERHEAD_BYTES = 768 * 1024**2


@dataclass(frozen=True)
class TrainSetup:
    """What one training step holds in memory, besides the architecture."""

    total_parameters: int
    trainable_parameters: int
    micro_batch_size: int
    seq_len: int
    supervised_per_example: int  # tokens whose logits are computed (the runtime skips the rest)
    precision: str
    device: str
    optimizer: str = "adamw"
    quantization: str = "none"
    world_size: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    attention: str = "sdpa"


def train_memory(a: Architecture, setup: TrainSetup) -> MemoryEstimate:
    """Peak memory of one training step on one device, by category.

    Activations per layer follow Korthikanti et al. 2022 (arXiv:2205.05198, eq. 2):
    s*b*h*(34 + 5*a*s/h) bytes with 2-byte activations; the 5*a*s/h term (attention scores,
    softmax and its dropout mask) is not stored by fused SDPA kernels. With gradient checkpointing
    each layer keeps only its input (2*s*b*h bytes) and one layer is recomputed at a time.
    ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054) divides optimizer state by the number of
    processes from stage 1, gradients from stage 2 and weights from stage 3.
    """
    st = setup
    frozen = st.total_parameters - st.trainable_parameters
    frozen_bytes = frozen * (_QUANTIZED_BYTES.get(st.quantization) or _WORKING_BYTES[st.precision])
    weights = frozen_bytes + st.trainable_parameters * (_WORKING_BYTES[st.precision] + _MASTER_BYTES[st.precision])
    gradients = st.trainable_parameters * _GRAD_BYTES[st.precision]
    if st.optimizer == "adafactor":
        optimizer = st.trainable_parameters * 4 // max(1, a.hidden)
    else:
        optimizer = st.trainable_parameters * _OPTIMIZER_BYTES[st.optimizer]
    world = max(1, st.world_size)
    if st.zero_stage >= 1:
        optimizer //= world
    if st.zero_stage >= 2:
        gradients //= world
    if st.zero_stage >= 3:
        weights //= world
    if st.offload_optimizer:
        optimizer = 0
    if st.offload_params:
        weights = 0
    s, b, h = st.seq_len, st.micro_batch_size, a.hidden
    width = _WORKING_BYTES[st.precision] / 2  # the formula counts 2-byte activations
    full_layer = s * b * h * 34 + (5 * a.heads * s * s * b if st.attention == "eager" else 0)
    if st.gradient_checkpointing:
        per_model = a.layers * 2 * s * b * h + full_layer
    else:
        per_model = a.layers * full_layer
    activations = int(per_model * width) + 2 * s * b * h * 4  # + embedding output and final norm, fp32
    logits = 3 * b * st.supervised_per_example * a.vocab_size * 4  # logits, softmax, gradient in fp32
    return MemoryEstimate(
        weights_bytes=int(weights),
        gradients_bytes=int(gradients),
        optimizer_bytes=int(optimizer),
        activations_bytes=activations,
        logits_bytes=logits,
        overhead_bytes=_CUDA_OVERHEAD_BYTES if st.device == "cuda" else 0,
    )


def train_flops(a: Architecture, non_embedding_parameters: int, *, tokens: int, supervised_tokens: int,
                mean_seq_len: float, trainable_fraction: float = 1.0) -> int:
    """Training FLOPs for `tokens` real tokens.

    Source: Kaplan et al. 2020 (arXiv:2001.08361), C = 6N per token for the dense layers (2N
    forward, 4N backward), plus the attention term 12 * layers * hidden * seq_len per token used
    by nanoGPT's estimate_mfu. With frozen weights the backward pass still propagates activation
    gradients (2N) but skips weight gradients (2N x frozen share). The LM head (2 * vocab * hidden
    per token, x3 for training) is counted only on supervised tokens, because the runtime computes
    logits only where the loss needs them.
    """
    per_token = (4 + 2 * trainable_fraction) * non_embedding_parameters + 12 * a.layers * a.hidden * mean_seq_len
    head = 6 * a.vocab_size * a.hidden
    return int(tokens * per_token + supervised_tokens * head)
