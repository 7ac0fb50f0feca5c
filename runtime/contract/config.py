"""The runtime config: `runtime.json`, the resolved recipe the runtime executes.

The compiler writes it into a build directory; the runtime never reads the recipe. Besides the
build directory, a run reads only what the config names outside it: a pinned asset from the
asset cache (looked up, never fetched: `runtime.contract.assets`), weights or a tokenizer on
the hub (`model.weights.hub`, through transformers' own cache), and a `model.weights.path`
(absolute, or relative to the directory `recipe run` is started from, as the recipe's was).
Standard library and pydantic only, like all of `runtime.contract`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.contract.packing import PACKED_KINDS

# Bump on any change a runtime of the previous version would misread.
SCHEMA_VERSION = 2
RUNTIME_CONFIG_FILE = "runtime.json"
# Supervised positions whose vocabulary logits `cross_entropy = "chunked"` computes at a time; the
# plan prices one chunk of them (runtime.core.cross_entropy).
LOSS_CHUNK_POSITIONS = 1024
# The stage kinds whose loss is the plain sum of token losses, which is all Liger's fused
# cross-entropy returns; dpo, ppo and grpo weight each token's log-probability differently.
FUSED_LOSS_KINDS = ("pretrain", "sft")


class IncompatibleBuildError(Exception):
    """A build directory this runtime cannot execute (missing, corrupt, or another schema version)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightsSpec(_Frozen):
    """Where pretrained weights come from; exactly one of the three is set."""

    hub: str | None = None
    revision: str | None = None
    path: str | None = None  # absolute or relative to the build directory's recipe; resolved at compile
    asset: str | None = None  # pinned asset name; the runtime fetches it from the asset cache


class ModelSpec(_Frozen):
    init: Literal["scratch", "pretrained"]
    family: str  # the architecture family the plan used (gpt2, llama, qwen3, mixtral, ..., or generic)
    # The architecture as config.json fields (for scratch: what the model is built from).
    config: dict[str, Any]
    weights: WeightsSpec | None
    trust_remote_code: bool
    quantization: Literal["none", "8bit", "4bit"]
    vocab_size: int
    n_positions: int
    eos_token_id: int | None
    pad_token_id: int | None


class TokenizerSpec(_Frozen):
    file: str | None  # tokenizer.json relative to the build directory, when the compiler had it
    hub: str | None  # otherwise loaded from the hub by the runtime
    eos_token: str | None
    pad_token: str | None


class TemplateSpec(_Frozen):
    """The exact templates used to render training examples; saved with the model."""

    prompt: str | None
    completion: str | None
    chat: str | None  # jinja2 source of the chat template
    chat_name: str | None
    system: str | None
    add_eos: bool
    loss: Literal["completion", "assistant", "last_assistant", "all"]


class DataSpec(_Frozen):
    # JSONL files relative to the build directory. With `tokenized`, each line holds
    # {"line", "prompt": [ids], "completion": [ids], "label"?}; otherwise the rows' fields.
    format: str
    template: TemplateSpec
    train: str
    heldout: str
    n_train: int
    n_heldout: int
    tokenized: bool
    max_total_tokens: int


class AdapterSpec(_Frozen):
    kind: Literal["full", "lora", "prefix", "freeze"]
    params: dict[str, Any] = Field(default_factory=dict)


class StageSpec(_Frozen):
    name: str
    kind: Literal["pretrain", "sft", "reward", "dpo", "ppo", "grpo"]
    data: str
    start: str  # "base" or an earlier stage's name
    adapter: AdapterSpec
    epochs: int
    max_steps: int | None
    micro_batch_size: int
    grad_accum: int
    learning_rate: float
    lr_schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"]
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    optimizer: Literal["adamw", "adamw_8bit", "sgd", "adafactor"]
    adam_betas: tuple[float, float]
    adam_eps: float
    momentum: float  # sgd
    log_every_steps: int
    eval_every_steps: int | None
    save_best: bool = False  # the stage's output is its best evaluation's weights
    early_stopping_patience: int | None = None  # evaluations without improvement before the stage stops
    save_every_steps: int | None
    keep_checkpoints: int
    length_grouping: bool
    packing: bool
    cross_entropy: Literal["chunked", "full", "fused"]  # how the LM head meets the loss (runtime.core.cross_entropy)
    compile: bool  # torch.compile each decoder block
    report_to: tuple[Literal["tensorboard", "wandb", "mlflow"], ...]  # experiment trackers, rank 0 logs
    params: dict[str, Any] = Field(default_factory=dict)  # kind-specific (beta, kl_coef, ...)


class EvalSpec(_Frozen):
    kind: Literal["classification", "language_model", "harness"]
    data: str
    stage: str
    label_field: str | None
    labels: tuple[str, ...]
    extract: Literal["first_word", "label_set"]
    max_new_tokens: int
    batch_size: int
    samples: int
    # kind = "harness": lm-evaluation-harness tasks, and folders of task YAML files (absolute, or
    # relative to the directory `recipe run` and `recipe eval` start from, as the recipe's were)
    tasks: tuple[str, ...] = ()
    task_dirs: tuple[str, ...] = ()
    num_fewshot: int | None = None
    limit: int | None = None


class HardwareSpec(_Frozen):
    device: Literal["cpu", "cuda"]
    gpu: str | None
    nproc_per_node: int
    nodes: int
    precision: Literal["fp32", "bf16", "fp16"]
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    gradient_checkpointing: bool
    attention: Literal["sdpa", "eager", "flash_attention_2"]
    # absent from builds that predate the key, whose runtime released freed blocks
    host_memory: Literal["release", "reuse"] = "release"


class RuntimeConfig(_Frozen):
    schema_version: int
    name: str
    seed: int
    model: ModelSpec
    tokenizer: TokenizerSpec
    data: dict[str, DataSpec]
    stages: tuple[StageSpec, ...] = Field(min_length=1)
    eval: EvalSpec | None
    hardware: HardwareSpec

    def to_json(self) -> str:
        """Deterministic serialisation: sorted keys, fixed indentation, trailing newline."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def unsupported(config: RuntimeConfig) -> list[str]:
    """What this runtime cannot execute yet, one sentence each; empty when it can run the build.

    The recipe language is ahead of the runtime: a build may ask for features that are planned
    (and priced) but not trained yet. Refusing them by name beats silently ignoring them."""
    out = []
    model, hw = config.model, config.hardware
    if model.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        out.append(f'model.quantization = "{model.quantization}" needs bitsandbytes; install the qlora extra '
                   "(pip install 'recipe[qlora]') or use quantization = \"none\"")
    if hw.attention == "flash_attention_2" and hw.device != "cuda":
        out.append('attention = "flash_attention_2" needs hardware.device = "cuda"')
    if config.eval is not None and config.eval.kind == "harness" and importlib.util.find_spec("lm_eval") is None:
        out.append(HARNESS_MISSING)
    for stage in config.stages:
        where = f'stage "{stage.name}"'
        if stage.kind in ("ppo", "grpo") and uses_deepspeed(hw):
            out.append(f"{where} is {stage.kind}, which runs on one process or DistributedDataParallel; "
                       "set hardware.zero_stage = 0 without offload for this recipe")
        if stage.kind in ("reward", "ppo") and stage.adapter.kind == "prefix":
            out.append(f"{where} is {stage.kind} with a prefix adapter; reward models and critics train "
                       "lora, freeze or full adapters")
        if stage.kind in ("reward", "ppo") and model.quantization != "none":
            out.append(f'{where} is {stage.kind}, whose reward model or critic is built from the weights of a '
                       f'causal model, which a quantized base cannot hand over; use model.quantization = "none"')
        if stage.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
            out.append(f"{where} asks for adamw_8bit, which needs bitsandbytes; install the qlora extra "
                       "(pip install 'recipe[qlora]') or use optimizer = \"adamw\"")
        if stage.packing and stage.kind not in PACKED_KINDS:
            out.append(f"{where} asks for packing, which packs pretrain and sft sequences; a {stage.kind} stage "
                       "compares or scores whole rows (set packing = false for it)")
        elif stage.packing and stage.adapter.kind == "prefix":
            out.append(f"{where} asks for packing with a prefix adapter, whose virtual tokens would be shared by "
                       'every sequence of a row (set packing = false, or adapter kind = "lora")')
        if stage.kind in ("ppo", "grpo") and stage.eval_every_steps:
            out.append(f"{where} is {stage.kind}, whose held-out measure is the reward of sampled completions, "
                       "reported before and after the stage; eval_every_steps is for stages with a held-out loss "
                       "(remove it)")
        if stage.save_best and hw.zero_stage == 3:
            out.append(f"{where} asks for save_best, which copies the best evaluation's weights from rank 0, but "
                       "ZeRO stage 3 shards them over the ranks; use hardware.zero_stage = 2 (or remove save_best)")
        out += _cross_entropy_refusals(where, stage, hw)
        if stage.compile and stage.kind in ("ppo", "grpo"):
            out.append(f"{where} is {stage.kind} with compile = true: generation feeds the blocks a key/value cache "
                       "whose state, strides and layer index change with every layer and token, so torch.compile "
                       "recompiles each block until it gives up (set compile = false for this stage)")
        elif stage.compile and stage.adapter.kind == "prefix":
            out.append(f"{where} asks for compile = true with a prefix adapter, whose prefixes reach the blocks as a "
                       "key/value cache indexed by layer, so torch.compile recompiles every block (one graph per layer "
                       "until its limit of 8); set compile = false, or adapter kind = \"lora\"")
        elif stage.compile and hw.zero_stage >= 3:
            out.append(f"{where} asks for compile = true under ZeRO-3, whose hooks gather and release each block's "
                       "parameters inside the compiled code, which recompiles until torch gives up and runs it eager; "
                       "set compile = false, or hardware.zero_stage = 2")
        for tracker in stage.report_to:
            if importlib.util.find_spec(TRACKER_MODULES[tracker]) is None:
                out.append(f'{where} reports to {tracker}, which is not installed: pip install "recipe[{tracker}]" '
                           f"(or remove it from train.report_to)")
        data = config.data[stage.data]
        if not data.tokenized:
            out.append(f'data set "{stage.data}" was not tokenized at compile time (the tokenizer was not available)')
    return out


def _cross_entropy_refusals(where: str, stage: StageSpec, hw: HardwareSpec) -> list[str]:
    """Why a stage's `cross_entropy = "fused"` cannot run here (empty when it can, or is not asked for)."""
    if stage.cross_entropy != "fused":
        return []
    if stage.kind == "reward":
        return [f'{where} is a reward model, whose scalar head has no vocabulary logits; remove cross_entropy = "fused"']
    if stage.kind not in FUSED_LOSS_KINDS:
        return [f'{where} is {stage.kind} with cross_entropy = "fused", whose kernel returns only the summed loss; '
                f'{stage.kind} needs each token\'s log-probability (use cross_entropy = "chunked")']
    if hw.device != "cuda":
        return [f'{where} asks for cross_entropy = "fused", Liger\'s Triton kernel, which needs hardware.device = '
                '"cuda" (use cross_entropy = "chunked")']
    if importlib.util.find_spec("liger_kernel") is None:
        return [f'{where} asks for cross_entropy = "fused", which needs liger-kernel; install the liger extra '
                '(pip install \'recipe[liger]\') or use cross_entropy = "chunked"']
    return []


HARNESS_MISSING = ('eval.kind = "harness" runs lm-evaluation-harness, which is not installed: '
                   'pip install "recipe[harness]" (or use kind = "language_model")')
# The module each experiment tracker (`report_to`) needs; installed by the extra of the same name.
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def uses_deepspeed(hw: HardwareSpec) -> bool:
    return bool(hw.zero_stage or hw.offload_optimizer or hw.offload_params)


def load_runtime_config(build_dir: Path) -> RuntimeConfig:
    """Read and check `runtime.json`; refuse builds written for another schema version."""
    path = Path(build_dir) / RUNTIME_CONFIG_FILE
    if not path.is_file():
        raise IncompatibleBuildError(
            f"{path} not found: {build_dir} is not a build directory (run `recipe compile RECIPE` first)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IncompatibleBuildError(f"{path} is not valid JSON ({exc}); recompile the recipe") from exc
    found = raw.get("schema_version") if isinstance(raw, dict) else None
    if found != SCHEMA_VERSION:
        raise IncompatibleBuildError(
            f"{path} has schema_version {found!r}, this runtime reads {SCHEMA_VERSION}; "
            "recompile the recipe with the installed `recipe`"
        )
    try:
        return RuntimeConfig.model_validate(raw)
    except ValidationError as exc:
        raise IncompatibleBuildError(f"{path} does not match schema_version {SCHEMA_VERSION}:\n{exc}") from exc
