"""What each stage will take: parameters, memory per device with a verdict, FLOPs, time and cost.

Gathers the facts (architecture, adapter, data lengths, hardware catalog, calibrated activation
coefficients) and calls the pure formulas in `compiler.estimation.estimate`. When a stage does not fit its
device, ranked suggestions follow, each with its own estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from compiler.estimation.catalog import activation_coefficients, hardware_catalog, load_accelerator
from compiler.estimation.estimate import (
    GIB,
    ActivationCoefficients,
    MemoryEstimate,
    TrainSetup,
    forward_flops,
    optimizer_step_seconds,
    step_overhead_seconds,
    logits_why,
    supervised_positions,
    train_flops,
    train_memory,
    wall_seconds,
)
from compiler.estimation.params import (
    Architecture,
    active_parameters,
    freeze_parameters,
    lora_parameters,
    parameters,
    prefix_parameters,
)
from compiler.loading.recipe import (
    DpoStage,
    GrpoStage,
    FreezeAdapter,
    FullAdapter,
    LoraAdapter,
    PpoStage,
    PrefixAdapter,
    PretrainedModel,
    Recipe,
    RewardStage,
    Stage,
    stage_adapter,
    training,
)
from runtime.contract.config import LOSS_CHUNK_POSITIONS

# Extra compute a memory-saving change costs, as a factor on the stage's time (for ranking).
_TIME_FACTOR = {"micro_batch": 1.05, "checkpointing": 1.33, "zero": 1.10, "offload": 1.50, "lora": 0.70,
                "quantization": 1.20, "chunked_loss": 1.02}


@dataclass(frozen=True)
class DeviceFacts:
    name: str
    kind: str  # cuda or cpu
    memory_gib: float | None
    peak_tflops: float
    mfu: float
    usd_per_hour: float
    memory_bandwidth_gb_per_s: float = 0.0
    process_overhead_gib: float | None = None
    step_overhead_s: float = 0.0
    layer_overhead_s: float = 0.0


def device_facts(recipe: Recipe) -> DeviceFacts:
    hw = recipe.hardware
    name = hw.gpu if hw.gpu and hw.gpu in hardware_catalog() else "cpu" if hw.device == "cpu" else None
    acc = load_accelerator(name) if name else None
    precision = hw.precision if acc is None or hw.precision in acc.peak_tflops else "fp32"
    peak = hw.peak_tflops or (acc.peak_tflops.get(precision) if acc else None) or 0.0
    memory = hw.memory_gib or (acc.memory_gib if acc and acc.memory_gib > 0 else None)
    return DeviceFacts(
        name=name or hw.device,
        kind=hw.device,
        memory_gib=memory,
        peak_tflops=peak,
        mfu=hw.mfu or (acc.mfu if acc else 0.40),
        usd_per_hour=hw.usd_per_hour if hw.usd_per_hour is not None else (acc.usd_per_hour if acc else 0.0),
        memory_bandwidth_gb_per_s=acc.memory_bandwidth_gb_per_s if acc else 0.0,
        process_overhead_gib=acc.process_overhead_gib if acc else None,
        step_overhead_s=acc.step_overhead_s if acc else 0.0,
        layer_overhead_s=acc.layer_overhead_s if acc else 0.0,
    )


@dataclass(frozen=True)
class Suggestion:
    change: str
    memory: MemoryEstimate
    fits: bool
    time_factor: float


@dataclass(frozen=True)
class StageEstimate:
    """What the plan says about one stage."""

    trainable_parameters: int
    total_parameters: int
    steps: int
    tokens: int
    flops: int
    memory: MemoryEstimate
    device: DeviceFacts
    fits: bool | None
    wall_s: float | None
    gpu_hours: float | None
    cost_usd: float | None
    suggestions: tuple[Suggestion, ...] = ()
    overhead_s: float = 0.0  # the part of wall_s besides the FLOPs: per-micro-batch costs and optimizer steps
    logits_why: str = ""  # how many positions' vocabulary logits the loss holds at once, and why


def trainable_parameters(arch: Architecture, adapter) -> int:
    """Parameters the adapter trains (all of the language model's for a full fine-tune: the runtime
    leaves a multimodal checkpoint's vision tower frozen, as text never reaches it)."""
    if isinstance(adapter, LoraAdapter):
        return lora_parameters(arch, adapter.rank, adapter.targets, adapter.expert_targets)
    if isinstance(adapter, PrefixAdapter):
        return prefix_parameters(arch, adapter.num_virtual_tokens, adapter.projection, adapter.projection_hidden_size)
    if isinstance(adapter, FreezeAdapter):
        return freeze_parameters(arch, adapter.trainable_layers, adapter.train_embeddings)
    return parameters(arch).text


def _coefficients(family: str) -> dict[str, ActivationCoefficients]:
    return {p: ActivationCoefficients(**values) for p, values in activation_coefficients(family).items()}


def estimate_stage(recipe: Recipe, arch: Architecture, family: str, stage: Stage, *, trainable: int, n_train: int,
                   tokens_per_epoch: int, supervised_per_epoch: int, max_total_tokens: int,
                   max_completion_tokens: int, mean_seq_len: float, steps: int, steps_per_epoch: int,
                   dropout: bool) -> StageEstimate:
    t = training(recipe, stage)
    hw = recipe.hardware
    world = hw.nodes * hw.nproc_per_node
    total = parameters(arch)
    adapter = stage_adapter(recipe, stage)
    epochs = steps / max(1, steps_per_epoch)
    tokens = int(tokens_per_epoch * epochs)
    supervised = int(supervised_per_epoch * epochs)
    if isinstance(stage, GrpoStage):  # each prompt is completed group_size times
        tokens, supervised = tokens * stage.group_size, supervised * stage.group_size
    pairs = isinstance(stage, DpoStage) or (isinstance(stage, RewardStage) and stage.objective == "pairwise")
    sequences = 2 if pairs else 1
    # A vision tower is held like a frozen model beside the language model the stage trains.
    vision = (total.vision,) if total.vision else ()
    # LoRA and prefix tuning add their weights to the base; freeze trains a share of it
    added = trainable if isinstance(adapter, (LoraAdapter, PrefixAdapter)) else 0
    device = device_facts(recipe)
    setup = TrainSetup(
        total_parameters=total.text + added, trainable_parameters=trainable, micro_batch_size=t.micro_batch_size,
        seq_len=max_total_tokens,
        supervised_per_example=1 if isinstance(stage, RewardStage) else max(1, max_completion_tokens if stage.kind == "sft"
                                                                             else max_total_tokens),
        precision=hw.precision, device=hw.device, optimizer=t.optimizer,
        quantization=recipe.model.quantization if isinstance(recipe.model, PretrainedModel) else "none",
        double_quantization=True,  # the runtime loads a 4-bit base as QLoRA does: NF4, double-quantized
        world_size=world, zero_stage=hw.zero_stage, offload_optimizer=hw.offload_optimizer,
        offload_params=hw.offload_params, gradient_checkpointing=hw.gradient_checkpointing, attention=hw.attention,
        grad_accum=t.grad_accum, dropout=dropout, sequences_per_example=sequences,
        frozen_model_parameters=vision + _frozen_models(stage, adapter, total.total), coefficients=_coefficients(family),
        process_overhead_bytes=_process_overhead_bytes(device),
        cross_entropy=t.cross_entropy, loss_chunk_positions=LOSS_CHUNK_POSITIONS,
    )
    memory = train_memory(arch, setup)
    # chunked: with more than one chunk a micro-batch, every supervised position's head runs twice forward
    recomputed = supervised * sequences if t.cross_entropy == "chunked" and \
        supervised_positions(setup) > LOSS_CHUNK_POSITIONS else 0
    # A mixture of experts computes with the experts its router picks: FLOPs from active parameters.
    active_non_embedding = active_parameters(arch) - total.embedding
    flops = _stage_flops(arch, stage, active_non_embedding, min(1.0, trainable / total.text), tokens * sequences,
                         supervised * sequences, mean_seq_len, recomputed)
    fits = None if device.memory_gib is None else memory.peak_bytes <= device.memory_gib * GIB
    per_micro_batch_s = device.step_overhead_s + arch.layers * device.layer_overhead_s
    optimizer_s = optimizer_step_seconds(trainable, t.optimizer, bandwidth_gb_per_s=device.memory_bandwidth_gb_per_s)
    overhead = step_overhead_seconds(steps=steps, micro_batches_per_step=t.grad_accum,
                                     micro_batch_overhead_s=per_micro_batch_s, optimizer_step_s=optimizer_s)
    wall = wall_seconds(flops, devices=world, peak_tflops=device.peak_tflops, mfu=device.mfu) + overhead \
        if device.peak_tflops else None
    device_hours = wall * world / 3600 if wall is not None else None
    gpu_hours = device_hours if device.kind == "cuda" else (0.0 if wall is not None else None)
    cost = device_hours * device.usd_per_hour if device_hours is not None else None
    suggestions = () if fits in (True, None) else _suggestions(arch, setup, t, device, adapter)
    return StageEstimate(trainable_parameters=trainable, total_parameters=total.total, steps=steps, tokens=tokens,
                         flops=flops, memory=memory, device=device, fits=fits, wall_s=wall, gpu_hours=gpu_hours,
                         cost_usd=cost, suggestions=suggestions, overhead_s=overhead if wall is not None else 0.0,
                         logits_why=logits_why(arch, setup))


def _process_overhead_bytes(device: DeviceFacts) -> int | None:
    return int(device.process_overhead_gib * GIB) if device.process_overhead_gib is not None else None


def _frozen_models(stage: Stage, adapter, total: int) -> tuple[int, ...]:
    """Models a stage holds besides the one it trains (with an adapter on the weights the reference
    names, the reference is the model with the adapter switched off, so it costs nothing extra)."""
    shares_base = isinstance(stage, (DpoStage, PpoStage, GrpoStage)) and isinstance(adapter, (LoraAdapter, PrefixAdapter)) \
        and (stage.reference or stage.start) == stage.start
    if isinstance(stage, DpoStage):
        return () if shares_base else (total,)
    if isinstance(stage, PpoStage):
        reference = () if shares_base else (total,)
        critic = (total,)  # trained, but counted as another full copy of weights (its state is small with an adapter)
        reward = (total,)
        return reference + critic + reward
    if isinstance(stage, GrpoStage):
        reference = () if shares_base or stage.kl_coef == 0 else (total,)
        return reference + (total,) * len(_reward_models(stage))
    return ()


def _reward_models(stage: GrpoStage) -> set[str]:
    return {r.stage for r in stage.rewards if r.kind == "reward_model"}


def _stage_flops(arch: Architecture, stage: Stage, non_embedding: int, trainable_fraction: float, tokens: int,
                 supervised: int, mean_seq_len: float, head_recomputed: int = 0) -> int:
    """Training FLOPs, plus the forward passes of frozen models and PPO's generation and scoring."""
    trained = train_flops(arch, non_embedding, tokens=tokens, supervised_tokens=supervised,
                          mean_seq_len=mean_seq_len, trainable_fraction=trainable_fraction,
                          head_recomputed_tokens=head_recomputed)
    forward = forward_flops(arch, non_embedding, tokens=tokens, mean_seq_len=mean_seq_len)
    if isinstance(stage, DpoStage):
        return trained + forward  # the reference model scores chosen and rejected once
    if isinstance(stage, PpoStage):
        # per rollout token: generation (actor), reference, reward and critic forwards, then
        # ppo_epochs of actor and critic updates
        return 4 * forward + stage.ppo_epochs * 2 * trained
    if isinstance(stage, GrpoStage):
        # per completion token (group_size per prompt, counted in `tokens`): generation, the
        # reference (kl_coef > 0), each reward model and the old policy (num_iterations > 1)
        # score once; then num_iterations updates
        scorers = 1 + (stage.kl_coef > 0) + len(_reward_models(stage)) + (stage.num_iterations > 1)
        return scorers * forward + stage.num_iterations * trained
    return trained


def _suggestions(arch: Architecture, setup: TrainSetup, t, device: DeviceFacts, adapter) -> tuple[Suggestion, ...]:
    """Changes that lower the peak, each re-estimated, fitting ones first (cheapest first); when no
    single change fits, the smallest combination that does, built greedily."""
    limit = device.memory_gib * GIB
    candidates = _candidate_changes(arch, setup, adapter, limit)
    out = [Suggestion(change, train_memory(arch, new), False, factor) for change, new, factor in candidates]
    out = [replace(s, fits=s.memory.peak_bytes <= limit) for s in out]
    if out and not any(s.fits for s in out):
        combined = _combine(arch, setup, adapter, limit)
        if combined is not None:
            out.append(combined)
    return tuple(sorted(out, key=lambda s: (not s.fits, s.time_factor if s.fits else s.memory.peak_bytes)))


def _candidate_changes(arch: Architecture, setup: TrainSetup, adapter, limit: float) -> list[tuple[str, TrainSetup, float]]:
    out: list[tuple[str, TrainSetup, float]] = []
    micro = setup.micro_batch_size
    while micro > 1:
        micro //= 2
        accum = setup.grad_accum * setup.micro_batch_size // micro
        candidate = replace(setup, micro_batch_size=micro, grad_accum=accum)
        if train_memory(arch, candidate).peak_bytes <= limit or micro == 1:
            out.append((f"micro_batch_size = {micro}, grad_accum = {accum} (same global batch)", candidate,
                        _TIME_FACTOR["micro_batch"]))
            break
    if setup.cross_entropy == "full" and supervised_positions(setup) > setup.loss_chunk_positions:
        out.append(('train.cross_entropy = "chunked"', replace(setup, cross_entropy="chunked"),
                    _TIME_FACTOR["chunked_loss"]))
    if not setup.gradient_checkpointing:
        out.append(("hardware.gradient_checkpointing = true", replace(setup, gradient_checkpointing=True),
                    _TIME_FACTOR["checkpointing"]))
    if setup.world_size > 1 and setup.zero_stage < 3:
        for stage in range(setup.zero_stage + 1, 4):
            out.append((f"hardware.zero_stage = {stage}", replace(setup, zero_stage=stage), _TIME_FACTOR["zero"]))
    if not setup.offload_optimizer:
        out.append(("hardware.zero_stage >= 1 with offload_optimizer = true",
                    replace(setup, zero_stage=max(1, setup.zero_stage), offload_optimizer=True), _TIME_FACTOR["offload"]))
    if isinstance(adapter, FullAdapter) and setup.trainable_parameters == setup.total_parameters:
        lora = lora_parameters(arch, 16, "all-linear")
        out.append(('[adapter] kind = "lora", rank = 16, targets = "all-linear"',
                    replace(setup, total_parameters=setup.total_parameters + lora, trainable_parameters=lora),
                    _TIME_FACTOR["lora"]))
    if setup.trainable_parameters < setup.total_parameters and setup.quantization == "none" and setup.device == "cuda":
        out.append(('model.quantization = "4bit" (QLoRA)', replace(setup, quantization="4bit"),
                    _TIME_FACTOR["quantization"]))
    return out


def _combine(arch: Architecture, setup: TrainSetup, adapter, limit: float) -> Suggestion | None:
    """Apply the change that lowers the peak most, then again from there, until it fits."""
    names: list[str] = []
    factor = 1.0
    current = setup
    for _ in range(6):
        options = _candidate_changes(arch, current, adapter, limit)
        if not options:
            return None
        change, new, f = min(options, key=lambda o: train_memory(arch, o[1]).peak_bytes)
        if train_memory(arch, new).peak_bytes >= train_memory(arch, current).peak_bytes:
            return None
        names.append(change)
        factor *= f
        current = new
        memory = train_memory(arch, current)
        if memory.peak_bytes <= limit:
            return Suggestion("together: " + "; ".join(names), memory, True, round(factor, 2))
    return None
