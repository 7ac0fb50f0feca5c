"""Memory, FLOPs, time and cost: pure functions of frozen inputs.

No file access, clock, environment or device probing here; the compiler gathers the inputs and
these functions only compute. Units are in the names: *_bytes, *_gib, *_flops, *_s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compiler.estimation.attention import attention_bytes, final_softcap_bytes_per_logit
from compiler.estimation.params import Architecture, block_linear_weights, block_parameters, layer_kinds, linear_shapes

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Training memory on one device, in bytes, by category, and the peak of one step.

    The categories are not all alive at once: with gradients freed after each optimizer step,
    the forward pass ends holding every activation and no gradient, and the backward pass frees
    activations as it creates gradients. `peak_bytes` is the larger of the two moments (see
    `train_memory`); `total_bytes` is the same figure, kept for readers of older plans."""

    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    logits_bytes: int
    overhead_bytes: int
    frozen_models_bytes: int = 0  # reference / reward models a stage holds besides the one it trains
    peak_bytes: int = 0
    gathered_bytes: int = 0  # ZeRO-3 / FSDP: sharded layers gathered whole for compute, beyond the shard

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes

    def breakdown(self) -> dict[str, int]:
        return {
            "weights": self.weights_bytes,
            "gathered": self.gathered_bytes,
            "frozen_models": self.frozen_models_bytes,
            "gradients": self.gradients_bytes,
            "optimizer": self.optimizer_bytes,
            "activations": self.activations_bytes,
            "logits": self.logits_bytes,
            "overhead": self.overhead_bytes,
        }

    def as_gib(self) -> dict[str, float]:
        parts = {**self.breakdown(), "total": self.peak_bytes}
        return {k: round(v / GIB, 3) for k, v in parts.items()}


# Bytes per value by training precision. Mixed precision keeps an fp32 master copy of the
# trainable weights next to the half-precision working copy.
_WORKING_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_MASTER_BYTES = {"fp32": 0, "bf16": 4, "fp16": 4}
_GRAD_BYTES = {"fp32": 4, "bf16": 4, "fp16": 4}
# Stored bytes per quantized weight, on average (the frozen models a stage holds besides the one it
# trains are priced with these). 4-bit (bitsandbytes NF4/FP4) packs two weights in a byte and keeps
# one fp32 absmax constant per block of 64 weights: 0.5 + 4/64. Double quantization (Dettmers et al.
# 2023, QLoRA, arXiv:2305.14314, section 3: "from 32/64 = 0.5 bits to 8/64 + 32/(64*256) = 0.127
# bits per parameter") stores those constants in 8 bits with one fp32 constant per 256 blocks;
# torchao's NF4 (torchtune's QLoRA: block 64, scaler block 256) does the same. 8-bit (LLM.int8) is
# one byte plus an fp32 scale per output row (4 / in_features bytes, left out here).
_QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}
_DOUBLE_QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256)}
# What bitsandbytes 0.50 allocates per quantized matrix besides the packed weights (its
# QuantState, bitsandbytes/functional.py): the 16-value fp32 NF4 code, and with double
# quantization the 256-value fp32 code of the 8-bit absmax and its fp32 offset.
_NF4_BLOCK, _NESTED_BLOCK = 64, 256
_NF4_CODE_BYTES, _NESTED_CODE_BYTES, _NESTED_OFFSET_BYTES = 16 * 4, 256 * 4, 4
# Optimizer state per trainable parameter: AdamW two fp32 moments; 8-bit AdamW two int8 moments
# (plus small block scales); SGD one fp32 momentum buffer. Adafactor's factored second moment is
# O(rows + cols) per matrix: counted as one fp32 value per hidden-width row, i.e. 4 / hidden.
_OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "sgd": 4}
# Values per logit (one position x one vocabulary entry) alive at the peak of the loss, by how the
# loss is computed: (values at the working width, fp32 values).
#   "fp32"          the whole sequence's logits upcast to fp32 (transformers' causal LMs, torchtune
#                   before its chunked loss, the runtime): fp32 logits, their log-softmax and its
#                   gradient
#   "chunked_fp32"  upcast one chunk at a time (torchtune's CEWithChunkedOutputLoss): the logits at
#                   the working width, and every chunk's fp32 log-softmax, saved for backward
#   "half"          cross-entropy on the working-width logits (LitGPT's chunked_cross_entropy, whose
#                   logit chunks the training loop holds through backward): logits and log-softmax
_LOSS_LOGIT_VALUES = {"fp32": (0, 3), "chunked_fp32": (1, 1), "half": (2, 0)}
# Autocast keeps a half-precision copy of each fp32 weight matrix it casts, saved for the backward
# pass and freed by it.
AUTOCAST_WEIGHT_COPY_BYTES = 2
# transformers' rotary embedding holds two fp32 buffers, `inv_freq` and `original_inv_freq`, of
# ceil(head_dim / 2) values each, once per model.
_ROTARY_BUFFERS = 2
# CUDA context plus allocator slack; measured figures vary by driver (300-900 MiB on recent GPUs).
# The default of a GPU whose hardware file gives no `process_overhead_gib`.
CUDA_OVERHEAD_BYTES = 768 * 1024**2


@dataclass(frozen=True)
class ActivationCoefficients:
    """Bytes saved for backward per token and per layer: per_hidden x h + per_intermediate x I +
    per_kv x (key/value width) + per_position x s, in fp32 and under bf16/fp16 autocast.

    Calibrated by simulating training steps of small models of each family on fake tensors
    (`compiler.estimation.precise`, `benchmarks/calibrate_activations.py`) and fitting the per-layer growth;
    values live in specs/estimates/activations.toml."""

    per_hidden: float
    per_intermediate: float
    per_kv: float
    per_position: float = 0.0
    dropout_per_hidden: float = 0.0  # extra when dropout is on (masks and dropped copies)
    outside_per_hidden: float = 0.0  # saved outside the blocks: embeddings, final norm, head input
    lora_dropout_per_input: float = 0.0  # per input unit of a LoRA-wrapped layer whose adapter applies dropout


# Korthikanti et al. 2022 (arXiv:2205.05198, eq. 2) for a GPT block with 2-byte activations:
# 34 bytes per hidden unit per token (attention 11, MLP 19 with a 4h MLP, norms 4) with dropout
# masks included; used when no calibrated coefficients are given.
KORTHIKANTI = ActivationCoefficients(per_hidden=34 - 16, per_intermediate=4, per_kv=0.0)


@dataclass(frozen=True)
class TrainSetup:
    """What one training step holds in memory, besides the architecture."""

    total_parameters: int  # every weight the trained model holds: the base, plus a LoRA or prefix adapter's
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
    grad_accum: int = 1
    dropout: bool = False
    sequences_per_example: int = 1  # 2 for preference pairs (chosen and rejected in one step)
    frozen_model_parameters: tuple[int, ...] = ()  # other models held frozen (reference, reward)
    master_weights: bool = True  # False: "pure" half precision, weights, gradients and optimizer state in bf16
    # each parameter is stepped, and its gradient freed, as backward produces it (torchtune's optimizer_in_bwd)
    optimizer_in_backward: bool = False
    double_quantization: bool = False  # quantized block constants quantized again (QLoRA; torchao's NF4)
    # the output layer quantized too (Lightning's BitsandbytesPrecision); transformers keeps it 16-bit
    quantized_head: bool = False
    # bitsandbytes' quantized matmuls keep their input for backward; torchao's NF4 (torchtune) does not
    quantized_keeps_inputs: bool = True
    loss_logits: str = "fp32"  # how the loss holds the logits: "fp32", "chunked_fp32" or "half" (_LOSS_LOGIT_VALUES)
    # train.cross_entropy: "full" holds every supervised position's logits at once; "chunked" at most
    # `loss_chunk_positions` of them (the rest recomputed in backward); "fused" never all of a chunk's
    cross_entropy: str = "full"
    loss_chunk_positions: int = 1024
    # per block, the summed input width of the LoRA-wrapped layers whose adapter applies dropout
    lora_dropout_inputs: int = 0
    coefficients: dict[str, ActivationCoefficients] = field(default_factory=dict)  # by key (coefficient_keys)
    # what the device holds besides the step: the CUDA context on a GPU; on CPU the interpreter,
    # torch, the tokenizer and the data (the hardware file's process_overhead_gib). None: the CUDA
    # default on cuda, nothing on cpu
    process_overhead_bytes: int | None = None


def half_precision_weights(st: TrainSetup) -> bool:
    """Whether the model's weights are stored in the half-precision dtype, which is then also the
    dtype of the residual stream between blocks.

    True in pure half precision, for an adapter over a frozen base (stored at the working width, as
    `train_memory` counts it) and under DeepSpeed, whose bf16/fp16 engine casts the module and keeps
    the fp32 master copy in the optimizer. False for fp32 weights under autocast (the runtime's full
    fine-tuning without DeepSpeed): the blocks' residual additions then stay in fp32."""
    if st.precision == "fp32":
        return False
    return not st.master_weights or st.trainable_parameters < st.total_parameters or uses_deepspeed(st)


def coefficient_keys(st: TrainSetup) -> list[str]:
    """The calibrated coefficient sets that describe this step, most specific first (keys of
    specs/estimates/activations.toml): "<precision>" for fp32 weights under autocast,
    "<precision>_pure" for half-precision weights, "_lora" for an adapter over a frozen base (a
    frozen linear layer keeps no input for backward) and "_qlora" when bitsandbytes quantized the
    base (MatMul4Bit and MatMul8bitLt keep `ctx.tensors = (A, B)`, the input included)."""
    if not half_precision_weights(st):
        return [st.precision, "fp32"]
    pure = f"{st.precision}_pure"
    keys = []
    if st.trainable_parameters < st.total_parameters:
        if st.quantization != "none" and st.quantized_keeps_inputs:
            keys.append(pure + "_qlora")
        keys.append(pure + "_lora")
    return keys + [pure, st.precision, "fp32"]


def activation_bytes(a: Architecture, st: TrainSetup) -> int:
    """Activations saved for the backward pass of one micro-batch, all layers."""
    c = next((st.coefficients[k] for k in coefficient_keys(st) if k in st.coefficients), KORTHIKANTI)
    tokens = st.seq_len * st.micro_batch_size * st.sequences_per_example
    per_token_layer = (c.per_hidden * a.hidden + c.per_intermediate * a.active_intermediate + c.per_kv * a.kv_width
                       + c.per_position * st.seq_len + (c.dropout_per_hidden * a.hidden if st.dropout else 0)
                       + c.lora_dropout_per_input * st.lora_dropout_inputs)
    if not st.coefficients:  # Korthikanti counts 2-byte values; scale to the working width
        per_token_layer *= _WORKING_BYTES[st.precision] / 2
    if st.gradient_checkpointing:
        # each layer keeps its input (one hidden-width value per token, in the residual stream's
        # dtype: fp32 under autocast over fp32 weights, which compiler.estimation.precise measures as 4 bytes);
        # one layer is recomputed at a time
        residual_bytes = _WORKING_BYTES[st.precision] if half_precision_weights(st) else 4
        per_model = tokens * (a.layers * a.hidden * residual_bytes + per_token_layer)
    else:
        per_model = tokens * a.layers * per_token_layer
    per_model += tokens * c.outside_per_hidden * a.hidden
    # the s x s terms (eager scores, sdpa's sliding-window masks): compiler.estimation.attention
    per_model += attention_bytes(a.attention, layers=a.layers, heads=a.heads, seq_len=st.seq_len,
                                 sequences=st.micro_batch_size * st.sequences_per_example,
                                 implementation=st.attention, working_bytes=_WORKING_BYTES[st.precision],
                                 checkpointed=st.gradient_checkpointing)
    # (autocast's half-precision copies of the fp32 trainable weights: `train_memory` adds them)
    return int(per_model)


def train_memory(a: Architecture, setup: TrainSetup) -> MemoryEstimate:
    """Peak memory of one training step on one device, by category.

    ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054) divides optimizer state by the number of
    processes from stage 1, gradients from stage 2 and weights from stage 3, where two layers at a
    time are gathered whole; offloading the parameters takes their gradients to the CPU as well. The
    peak is the larger of the end of the forward pass (weights, optimizer state, all activations and
    logits, plus gradients still held from earlier micro-batches when accumulating, or the one
    gradient alive when the optimizer steps inside backward) and the end of the backward pass
    (weights, optimizer state and all gradients).
    """
    st = setup
    working = _WORKING_BYTES[st.precision]
    pure = not st.master_weights and st.precision != "fp32"
    weights = stored_weight_bytes(a, st)
    gradients = st.trainable_parameters * (working if pure else _GRAD_BYTES[st.precision])
    if st.optimizer_in_backward:
        # Each parameter is stepped and its gradient freed as soon as backward produces it
        # (torchtune's optimizer_in_bwd; LOMO, Lv et al. 2023, arXiv:2306.09782): one gradient is
        # alive at a time, at most the embedding-sized output matrix, which backward produces first
        # while the activations are still held.
        gradients = min(gradients, a.vocab_size * a.hidden * (working if pure else _GRAD_BYTES[st.precision]))
    if st.optimizer == "adafactor":
        optimizer = st.trainable_parameters * 4 // max(1, a.hidden)
    else:
        # optimizer state takes the parameters' dtype: half of fp32's size in pure half precision
        optimizer = st.trainable_parameters * _OPTIMIZER_BYTES[st.optimizer] // (2 if pure and st.optimizer != "adamw_8bit" else 1)
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
        # FSDP's CPUOffload(offload_params=True) "implicitly enables gradient offloading to CPU"
        # (torch.distributed.fsdp docs); ZeRO-3's offload_param keeps the partitions on the CPU too
        weights = gradients = 0
    # A sharded layer is gathered whole before it computes, and the next one is prefetched: FSDP's
    # limit_all_gathers keeps "GPU memory usage from only two consecutive FSDP instances (the current
    # instance running computation and the next instance whose all-gather is prefetched)"
    # (torch.distributed.fsdp docs). Two blocks at their stored width, offloaded or not.
    gathered = 2 * _stored_block_bytes(a, st) if st.zero_stage >= 3 and world > 1 else 0
    others = sum(int(n * _quantized_bytes(st)) for n in st.frozen_model_parameters)
    # autocast's half-precision copies of the fp32 trainable weights, saved for backward like the
    # activations (the calibrated coefficients leave them out: benchmarks/calibrate_activations.py)
    activations = activation_bytes(a, st) + st.trainable_parameters * _autocast_copy_bytes(st)
    logits = logits_bytes(a, st)
    overhead = st.process_overhead_bytes if st.process_overhead_bytes is not None \
        else (CUDA_OVERHEAD_BYTES if st.device == "cuda" else 0)
    held_gradients = gradients if st.grad_accum > 1 or st.optimizer_in_backward else 0
    forward_end = activations + logits + held_gradients
    backward_end = gradients
    peak = int(weights) + gathered + others + int(optimizer) + max(forward_end, backward_end) + overhead
    return MemoryEstimate(
        weights_bytes=int(weights),
        gradients_bytes=int(gradients),
        optimizer_bytes=int(optimizer),
        activations_bytes=activations,
        logits_bytes=logits,
        overhead_bytes=overhead,
        frozen_models_bytes=others,
        peak_bytes=peak,
        gathered_bytes=gathered,
    )


def uses_deepspeed(st: TrainSetup) -> bool:
    """Whether the step runs under DeepSpeed (ZeRO or offload), whose engine holds the weights itself."""
    return st.zero_stage > 0 or st.offload_optimizer or st.offload_params


def stored_weight_bytes(a: Architecture, st: TrainSetup) -> int:
    """The weights as the runtime holds them on one device, before ZeRO shards them.

    The frozen weights are stored at the working width (bf16 or fp16 under mixed precision) or
    quantized; the trainable ones as fp32 master copies, which the optimizer updates and autocast
    casts to the working width as each layer computes (those copies are counted with the
    activations). DeepSpeed's bf16/fp16 engine instead casts the module to the working width and
    keeps the fp32 master copy in its optimizer: both are counted. In pure half precision the
    trainable weights are stored at the working width only. Rotary models add their fp32
    inverse-frequency buffers."""
    working = _WORKING_BYTES[st.precision]
    frozen = st.total_parameters - st.trainable_parameters
    quantized = quantized_parameters(a, st)
    if quantized > frozen:  # counts that are not this architecture's: price every frozen weight as quantized
        frozen_bytes = int(frozen * _quantized_bytes(st))
    else:
        frozen_bytes = quantized_matrices_bytes(a, st) + (frozen - quantized) * working
    if st.precision == "fp32":
        trainable_width = 4
    elif not st.master_weights:
        trainable_width = working
    elif uses_deepspeed(st):
        trainable_width = working + _MASTER_BYTES[st.precision]
    else:
        trainable_width = _MASTER_BYTES[st.precision]
    buffers = _ROTARY_BUFFERS * -(-a.head_dim // 2) * 4 if a.positions == 0 else 0
    return frozen_bytes + st.trainable_parameters * trainable_width + buffers


def _autocast_copy_bytes(st: TrainSetup) -> int:
    """Bytes per trainable weight of autocast's working-width copy: only fp32 master weights that
    autocast casts, i.e. mixed precision without DeepSpeed (whose engine computes in half)."""
    if st.precision == "fp32" or not st.master_weights or uses_deepspeed(st):
        return 0
    return AUTOCAST_WEIGHT_COPY_BYTES


def quantized_matrix_bytes(rows: int, cols: int, st: TrainSetup) -> int:
    """Bytes bitsandbytes allocates for one quantized `rows x cols` weight matrix.

    8-bit (Linear8bitLt): int8 weights and one fp32 scale per output row (`SCB`). 4-bit
    (Linear4bit): two weights per byte, one absmax per block of 64 weights (fp32, or uint8 when
    double-quantized, with one fp32 absmax per 256 blocks, a 256-value code and an offset), and
    the 16-value NF4 code."""
    n = rows * cols
    if st.quantization == "8bit":
        return n + 4 * cols
    blocks = -(-n // _NF4_BLOCK)
    packed = -(-n // 2)
    if not st.double_quantization:
        return packed + 4 * blocks + _NF4_CODE_BYTES
    nested = -(-blocks // _NESTED_BLOCK)
    return packed + blocks + 4 * nested + _NESTED_CODE_BYTES + _NESTED_OFFSET_BYTES + _NF4_CODE_BYTES


def quantized_matrices_bytes(a: Architecture, st: TrainSetup) -> int:
    """Bytes of every matrix `quantized_parameters` counts, as bitsandbytes stores them."""
    if st.quantization == "none":
        return 0
    shapes = [(i, o) for _, i, o, _ in a.meta.all_linears] if a.meta is not None else \
        [(i, o) for n, sparse in layer_kinds(a) for _ in range(n) for _, i, o, _ in linear_shapes(a, sparse)]
    if st.quantized_head and not a.tied_embeddings:
        shapes.append((a.hidden, a.vocab_size))
    return sum(quantized_matrix_bytes(i, o, st) for i, o in shapes)


def supervised_positions(st: TrainSetup) -> int:
    """Positions of one micro-batch whose next token is supervised: the rows the LM head computes."""
    return st.micro_batch_size * st.sequences_per_example * st.supervised_per_example


def logit_positions(a: Architecture, st: TrainSetup) -> int:
    """Positions whose full-vocabulary logits are alive at once (see `logits_bytes`)."""
    n = supervised_positions(st)
    if st.cross_entropy == "chunked":
        return min(n, st.loss_chunk_positions)
    if st.cross_entropy == "fused":
        # Liger's kernel takes chunks of n / ceil(vocab / hidden) positions, about n x hidden logits
        return -(-n // max(1, -(-a.vocab_size // a.hidden)))
    return n


def logits_bytes(a: Architecture, st: TrainSetup) -> int:
    """The loss's vocabulary logits at their peak: positions alive at once x vocab x bytes per logit.

    With "full" autograd keeps every supervised position's fp32 log-softmax until backward, where
    its gradient and the logits' gradient join it (3 fp32 values per logit, `_LOSS_LOGIT_VALUES`).
    With "chunked" the same three values exist for one chunk only: each chunk's logits are
    recomputed in backward and freed before the next (runtime.core.cross_entropy). A step whose
    supervised positions fit in one chunk is the full case. Measured on CPU by
    benchmarks/loss_throughput.py (the RSS high-water mark of a large-vocabulary model)."""
    working_values, fp32_values = _LOSS_LOGIT_VALUES[st.loss_logits]
    working = _WORKING_BYTES[st.precision]
    loss_width = 4 if fp32_values else working
    per_logit = working_values * working + fp32_values * 4 + final_softcap_bytes_per_logit(a.attention, loss_width)
    if st.cross_entropy == "fused":
        per_logit = 2 * 4  # the fp32 chunk of logits, overwritten in place by its gradient
    return logit_positions(a, st) * a.vocab_size * per_logit


def logits_why(a: Architecture, st: TrainSetup) -> str:
    """One sentence: how many positions' logits the loss holds at once, and why."""
    n, alive = supervised_positions(st), logit_positions(a, st)
    head = f"{alive:,} of {n:,} supervised positions x {a.vocab_size:,} vocabulary"
    if st.cross_entropy == "chunked" and alive < n:
        return (f"{head}: train.cross_entropy = \"chunked\" computes {st.loss_chunk_positions:,} positions' logits "
                "at a time and recomputes each chunk in backward, so one chunk is held, never the batch's")
    if st.cross_entropy == "chunked":
        return f"{head}: the micro-batch's supervised positions fit in one chunk of {st.loss_chunk_positions:,}"
    if st.cross_entropy == "fused":
        return (f"{head}: Liger's fused linear cross-entropy (train.cross_entropy = \"fused\") takes chunks of "
                "about positions x hidden / vocab and never keeps their logits")
    return (f"{head}: train.cross_entropy = \"full\" keeps every supervised position's fp32 logits until backward "
            "(\"chunked\" holds one chunk)")


def quantized_parameters(a: Architecture, st: TrainSetup) -> int:
    """Weights a 4-/8-bit quantization stores at its reduced width: the weight matrices of every
    block's linear layers, and the output layer's when `quantized_head` (an untied one). Embeddings,
    norms and biases stay at the working width (bitsandbytes replaces nn.Linear only)."""
    if st.quantization == "none":
        return 0
    blocks = block_linear_weights(a)
    head = a.vocab_size * a.hidden if st.quantized_head and not a.tied_embeddings else 0
    return blocks + head


def _stored_block_bytes(a: Architecture, st: TrainSetup) -> int:
    """Bytes of one block's weights as stored: its linear weight matrices at the quantized width when
    the base is quantized, everything else at the working width."""
    block = block_parameters(a)
    if st.quantization == "none":
        return block * _WORKING_BYTES[st.precision]
    linear = sum(i * o for _, i, o, _ in linear_shapes(a))
    return int(linear * _quantized_bytes(st)) + (block - linear) * _WORKING_BYTES[st.precision]


def _quantized_bytes(st: TrainSetup) -> float:
    if st.quantization == "none":
        return float(_WORKING_BYTES[st.precision])
    return (_DOUBLE_QUANTIZED_BYTES if st.double_quantization else _QUANTIZED_BYTES)[st.quantization]


def train_flops(a: Architecture, non_embedding_parameters: int, *, tokens: int, supervised_tokens: int,
                mean_seq_len: float, trainable_fraction: float = 1.0, head_recomputed_tokens: int = 0) -> int:
    """Training FLOPs for `tokens` real tokens.

    Source: Kaplan et al. 2020 (arXiv:2001.08361), C = 6N per token for the dense layers (2N
    forward, 4N backward), plus the attention term 12 * layers * hidden * seq_len per token used
    by nanoGPT's estimate_mfu. With frozen weights the backward pass still propagates activation
    gradients (2N) but skips weight gradients (2N x frozen share). The LM head (2 * vocab * hidden
    per token, x3 for training) is counted only on supervised tokens, because the runtime computes
    logits only where the loss needs them; the chunked loss recomputes the head's forward (2 x vocab
    x hidden) on `head_recomputed_tokens` in backward.
    """
    per_token = (4 + 2 * trainable_fraction) * non_embedding_parameters + 12 * a.layers * a.hidden * mean_seq_len
    head = 6 * a.vocab_size * a.hidden
    return int(tokens * per_token + supervised_tokens * head + head_recomputed_tokens * 2 * a.vocab_size * a.hidden)


def forward_flops(a: Architecture, non_embedding_parameters: int, *, tokens: int, mean_seq_len: float) -> int:
    """Inference FLOPs (2N per token plus the attention term) for frozen models and generation."""
    return int(tokens * (2 * non_embedding_parameters + 4 * a.layers * a.hidden * mean_seq_len))


def wall_seconds(flops: int, *, devices: int, peak_tflops: float, mfu: float) -> float:
    """Time at a model-FLOPs utilisation `mfu` of the devices' dense peak (nanoGPT's estimate_mfu)."""
    return flops / (devices * peak_tflops * 1e12 * mfu)


# Bytes one optimizer step moves per trainable parameter, beyond its state (_OPTIMIZER_BYTES):
# it reads the fp32 weight and its gradient and writes the weight back (4 + 4 + 4), and reads and
# writes each state value once (2 x the state's bytes). AdamW in fp32: 12 + 2 x 8 = 28 bytes.
_STEP_BYTES_PER_WEIGHT = 12


def optimizer_step_seconds(trainable_parameters: int, optimizer: str, *, bandwidth_gb_per_s: float) -> float:
    """One optimizer step's time: an elementwise pass over weights, gradients and state, bound by
    memory bandwidth (its FLOPs are a few per parameter, negligible beside the bytes)."""
    if bandwidth_gb_per_s <= 0:
        return 0.0
    state = 0 if optimizer == "adafactor" else _OPTIMIZER_BYTES.get(optimizer, 8)
    return trainable_parameters * (_STEP_BYTES_PER_WEIGHT + 2 * state) / (bandwidth_gb_per_s * 1e9)


def step_overhead_seconds(*, steps: int, micro_batches_per_step: int, micro_batch_overhead_s: float,
                          optimizer_step_s: float) -> float:
    """What a stage spends besides its FLOPs: a fixed cost per micro-batch (collating, Python,
    kernel launches: the hardware file's step_overhead_s plus layer_overhead_s per block, measured
    by `recipe hardware probe` on steps too small for their FLOPs to matter) and the optimizer
    step after each accumulation."""
    return steps * (micro_batches_per_step * micro_batch_overhead_s + optimizer_step_s)
