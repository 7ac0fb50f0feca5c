"""Training: shared hyperparameters in [train], and the stages that use them in order."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import regex
from pydantic import Field, create_model, field_validator, model_validator

from compiler.loading.spec.base import (
    Auto,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Section,
)
from compiler.loading.spec.model import AdapterSection


class TrainSection(Section):
    """Training hyperparameters shared by every stage; a stage may override any of them."""

    epochs: PositiveInt = 3
    """Passes over the stage's training data."""
    max_steps: PositiveInt | None = None
    """Stop after this many optimizer steps instead of counting epochs."""
    micro_batch_size: PositiveInt = 8
    """Examples per device per forward/backward pass."""
    grad_accum: PositiveInt = 1
    """Micro-batches accumulated before each optimizer step."""
    global_batch_size: PositiveInt | None = None
    """Examples per optimizer step across all devices. Optional: when given, it must equal
    micro_batch_size x grad_accum x GPUs per node x nodes, as a check on the arithmetic."""
    learning_rate: PositiveFloat = 5e-4
    """Peak learning rate."""
    lr_schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Shape of the learning-rate curve after warmup."""
    warmup_steps: NonNegativeInt = 0
    """Steps of linear warmup from 0 to the peak learning rate."""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1.0)] | None = None
    """Warmup as a share of all steps; instead of warmup_steps."""
    weight_decay: NonNegativeFloat = 0.0
    """Decoupled weight decay (applied to matrices, not to biases and norms)."""
    max_grad_norm: PositiveFloat = 1.0
    """Clip the global gradient norm to this value."""
    optimizer: Literal["adamw", "adamw_8bit", "sgd", "adafactor"] = "adamw"
    """Optimizer. adamw_8bit is bitsandbytes' 8-bit AdamW (the qlora extra; cpu and cuda)."""
    adam_betas: Annotated[tuple[float, float], Field(strict=False)] = (0.9, 0.999)  # TOML and JSON have lists
    """AdamW beta1, beta2."""
    adam_eps: PositiveFloat = 1e-8
    """AdamW epsilon."""
    momentum: Probability = 0.9
    """SGD momentum."""
    log_every_steps: PositiveInt = 10
    """Write a metrics line every this many steps."""
    eval_every_steps: PositiveInt | None = None
    """Compute the held-out loss every this many steps and after the last, into metrics.jsonl and
    the trackers (default: not during training). Not for ppo stages."""
    save_best: bool = False
    """Keep the weights of the evaluation with the lowest held-out loss as the stage's output (and
    model/), not the last step's; needs eval_every_steps."""
    early_stopping_patience: PositiveInt | None = None
    """Stop the stage after this many evaluations in a row without a lower held-out loss; epochs or
    max_steps become an upper bound. Needs eval_every_steps."""
    save_every_steps: PositiveInt | None = None
    """Write a resumable checkpoint every this many steps (default: at the end of the stage)."""
    keep_checkpoints: PositiveInt = 2
    """How many recent checkpoints to keep."""
    length_grouping: bool = True
    """Batch examples of similar length together, so little padding is computed."""
    packing: bool = False
    """Pack several sequences into each row of the token budget (pretrain and sft; each sequence attends only to itself)."""
    cross_entropy: Literal["chunked", "full", "fused"] = "chunked"
    """How the LM head meets the loss: "chunked" computes the vocabulary logits of 1,024 supervised
    positions at a time and recomputes them in backward, so one chunk is held, never the batch's;
    "full" computes them all at once (autograd keeps them until backward); "fused" is Liger's fused
    linear cross-entropy (CUDA, the liger extra; pretrain and sft). Reward models have no
    vocabulary head and ignore it."""
    compile: bool = False
    """torch.compile each decoder block (dynamic shapes, so varying batch lengths do not recompile);
    the first step's compile time is reported apart (compile_s in the run report)."""
    report_to: Annotated[tuple[Literal["tensorboard", "wandb", "mlflow"], ...], Field(strict=False)] = ()
    """Experiment trackers that get the metrics, the runtime config and the plan's headline numbers:
    any of "tensorboard" (event files under runs/), "wandb", "mlflow". Each is an optional extra
    (pip install "recipe[wandb]"); credentials come from the environment only."""

    @model_validator(mode="after")
    def _one_length(self) -> TrainSection:
        if "epochs" in self.model_fields_set and self.max_steps is not None:
            raise ValueError("give epochs or max_steps, not both")
        if self.warmup_ratio is not None and "warmup_steps" in self.model_fields_set:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if self.report_to is not None and len(set(self.report_to)) != len(self.report_to):
            raise ValueError("report_to names a tracker twice; list each once")
        return self


TRAIN_KEYS = tuple(TrainSection.model_fields)


def _overridable(section: type[Section]) -> dict[str, Any]:
    """The fields of `section`, each optional with default None (= inherit from [train])."""
    out: dict[str, Any] = {}
    for name, info in section.model_fields.items():
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        out[name] = (Optional[annotation], Field(None, description=f"{info.description} Overrides [train]."))
    return out


class _StageIdentity(Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    """Stage name: lowercase letters, digits, '.', '_' or '-'. Later stages refer to it."""
    data: str | None = None
    """Data set to train on (a name under [data]); may be omitted when the recipe has one data set."""
    start: str = Field("base", alias="from")
    """Weights this stage starts from: "base" (the recipe's [model]) or the name of an earlier stage."""
    adapter: AdapterSection | None = None
    """Adapter for this stage; otherwise the recipe's [adapter]."""


_StageBase = create_model("_StageBase", __base__=_StageIdentity, **_overridable(TrainSection))


class PretrainStage(_StageBase):
    """Next-token prediction on every token of the data."""

    kind: Literal["pretrain"]
    """pretrain, sft, reward, dpo, ppo or grpo."""


class SftStage(_StageBase):
    """Supervised fine-tuning: loss on the completion or assistant tokens only (see template.loss)."""

    kind: Literal["sft"]
    """pretrain, sft, reward, dpo, ppo or grpo."""


class RewardStage(_StageBase):
    """A reward model: the language model with a scalar head."""

    kind: Literal["reward"]
    """pretrain, sft, reward, dpo, ppo or grpo."""
    objective: Literal["pairwise", "regression"] = "pairwise"
    """pairwise: chosen must outscore rejected (preference data); regression: predict a score."""
    score_field: str = "score"
    """With objective = "regression": the numeric field to predict."""


class DpoStage(_StageBase):
    """Direct preference optimisation against a frozen reference model."""

    kind: Literal["dpo"]
    """pretrain, sft, reward, dpo, ppo or grpo."""
    beta: PositiveFloat = 0.1
    """Strength of the implicit KL penalty towards the reference model."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """DPO loss variant."""
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    """Conservative DPO: assumed share of flipped preference labels."""
    reference: str | None = None
    """Frozen reference: "base" or an earlier stage; defaults to the stage this one starts from."""


class GenerationSection(Section):
    """Sampling settings for rollouts and sample generations."""

    max_new_tokens: PositiveInt | Auto = "auto"
    """Tokens to generate; "auto" uses the longest completion in the data."""
    do_sample: bool = True
    """Sample (true) or decode greedily (false)."""
    temperature: PositiveFloat = 1.0
    """Softmax temperature when sampling."""
    top_k: NonNegativeInt = 0
    """Sample from the k most likely tokens (0: no limit)."""
    top_p: float = Field(default=1.0, gt=0, le=1.0)
    """Nucleus sampling: the smallest token set with this much probability."""


class PpoStage(_StageBase):
    """PPO against a reward model: actor, critic, frozen reference and reward model."""

    kind: Literal["ppo"]
    """pretrain, sft, reward, dpo, ppo or grpo."""
    reward_model: str
    """The earlier reward stage that scores rollouts."""
    reference: str | None = None
    """Frozen reference for the KL penalty: "base" or an earlier stage; defaults to `from`."""
    critic_from: str | None = None
    """Initial critic weights: an earlier stage; defaults to reward_model."""
    kl_coef: NonNegativeFloat = 0.1
    """Weight of the per-token KL penalty towards the reference."""
    clip_eps: PositiveFloat = 0.2
    """Policy ratio clip range."""
    value_clip: PositiveFloat = 0.4
    """Value function clip range."""
    ptx_coef: Annotated[float, Field(ge=0, le=1.0)] = 0.0
    """Share of the pretraining (PTX) loss in the actor's loss: (1 - ptx_coef) x PPO + ptx_coef x PTX."""
    ptx_data: str | None = None
    """Data set for the PTX loss (needed when ptx_coef > 0)."""
    gamma: float = Field(default=1.0, gt=0, le=1.0)
    """Discount factor."""
    lam: float = Field(default=0.95, ge=0, le=1.0)
    """GAE lambda."""
    ppo_epochs: PositiveInt = 4
    """Optimisation passes over each batch of rollouts."""
    rollout_batch_size: PositiveInt = 8
    """Prompts per rollout batch."""
    critic_learning_rate: PositiveFloat | None = None
    """Critic learning rate; defaults to the stage's learning_rate."""
    generation: GenerationSection = GenerationSection()
    """How rollouts are sampled."""

    @model_validator(mode="after")
    def _ptx(self) -> PpoStage:
        if self.ptx_coef > 0 and self.ptx_data is None:
            raise ValueError(f"ptx_coef = {self.ptx_coef} needs ptx_data = \"<data set name>\"")
        return self


class _RewardBase(Section):
    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    """Names the reward in metrics and reports; defaults to its kind (give one when two share a kind)."""
    weight: float = 1.0
    """Its weight in the stage's reward (the weighted sum of all rewards)."""


class ExactMatchReward(_RewardBase):
    """1 when the completion equals a data field, else 0."""

    kind: Literal["exact_match"]
    """exact_match, label_set, regex, length, reward_model or python."""
    field: str
    """The data field holding the expected answer."""
    strip: bool = True
    """Ignore leading and trailing whitespace on both sides."""
    lower: bool = False
    """Compare case-insensitively."""


class LabelSetReward(_RewardBase):
    """1 when the label read from the completion is the row's label, else 0."""

    kind: Literal["label_set"]
    """exact_match, label_set, regex, length, reward_model or python."""
    field: str
    """The data field holding the label (a derived label field names its labels itself)."""
    labels: list[str] | None = Field(None, min_length=1)
    """The label set; defaults to the labels of the derived field."""
    extract: Literal["first_word", "label_set"] = "label_set"
    """How the label is read: the completion's first word, or the label it starts with (case-insensitive)."""


class RegexReward(_RewardBase):
    """1 when the pattern matches somewhere in the completion, else 0."""

    kind: Literal["regex"]
    """exact_match, label_set, regex, length, reward_model or python."""
    pattern: str
    """A regular expression (Python `regex` syntax)."""
    timeout_s: float = Field(0.1, gt=0.0, le=10.0)
    """Time limit of one match; a match that runs out of time scores 0 (guards against catastrophic backtracking)."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            regex.compile(pattern)
        except regex.error as exc:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None
        return pattern


class LengthReward(_RewardBase):
    """-(completion tokens beyond max_tokens): a penalty of `weight` per extra token."""

    kind: Literal["length"]
    """exact_match, label_set, regex, length, reward_model or python."""
    max_tokens: PositiveInt
    """Completion tokens allowed without penalty."""


class ModelReward(_RewardBase):
    """The score an earlier reward stage gives the whole prompt + completion."""

    kind: Literal["reward_model"]
    """exact_match, label_set, regex, length, reward_model or python."""
    stage: str
    """The earlier stage with kind = "reward"."""


class PythonReward(_RewardBase):
    """Your own function(texts, fields) -> list of floats. Runs code: needs allow_code = true at the top level."""

    kind: Literal["python"]
    """exact_match, label_set, regex, length, reward_model or python."""
    function: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
    """"module:function", importable by the runtime."""


RewardSection = Annotated[
    Union[ExactMatchReward, LabelSetReward, RegexReward, LengthReward, ModelReward, PythonReward],
    Field(discriminator="kind"),
]


class GrpoStage(_StageBase):
    """Group-relative policy optimisation with rewards computed from the data (no critic, no learned value)."""

    kind: Literal["grpo"]
    """pretrain, sft, reward, dpo, ppo or grpo."""
    rewards: list[RewardSection] = Field(min_length=1)
    """The reward functions, [[stages.rewards]] tables; the stage's reward is their weighted sum."""
    group_size: int = Field(8, ge=2)
    """Completions sampled per prompt; advantages are relative to the group."""
    rollout_batch_size: PositiveInt = 4
    """Prompts per step and process (each sampled group_size times)."""
    scale_rewards: Literal["group", "none"] = "group"
    """group: divide advantages by the group's reward std; none: only subtract the mean (Dr. GRPO)."""
    clip_eps: PositiveFloat = 0.2
    """Policy ratio clip range (below 1, and above unless clip_eps_high is set)."""
    clip_eps_high: PositiveFloat | None = None
    """Upper clip range (DAPO's clip-higher); defaults to clip_eps."""
    kl_coef: NonNegativeFloat = 0.0
    """Weight of the k3 KL penalty to the frozen reference; 0 holds no reference model."""
    reference: str | None = None
    """Frozen reference for the KL penalty: "base" or an earlier stage; defaults to `from`."""
    loss_aggregation: Literal["token", "sequence"] = "token"
    """token: mean over all completion tokens of the batch; sequence: mean per completion, then over completions."""
    num_iterations: PositiveInt = 1
    """Optimisation passes over each step's completions."""
    heldout_prompts: PositiveInt = 64
    """Held-out prompts whose greedy completions are scored before and after the stage."""
    generation: GenerationSection = GenerationSection()
    """How completions are sampled."""

    @model_validator(mode="after")
    def _names(self) -> GrpoStage:
        names = [r.name or r.kind for r in self.rewards]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two rewards are named {twice[0]!r}: give each a distinct name = \"...\"")
        return self


StageSection = Annotated[
    Union[PretrainStage, SftStage, RewardStage, DpoStage, PpoStage, GrpoStage], Field(discriminator="kind")
]


class EvalSection(Section):
    """What is measured after training, on held-out rows."""

    kind: Literal["classification", "language_model", "harness"] = "classification"
    """classification: generate after the prompt and compare with a label; language_model: loss,
    perplexity and sample generations; harness: those of language_model, and lm-evaluation-harness
    `tasks` on the trained model (the harness extra: pip install "recipe[harness]")."""
    data: str | None = None
    """Data set whose held-out rows are evaluated; defaults to the last training stage's."""
    stage: str | None = None
    """Stage whose model is evaluated; defaults to the last stage."""
    label_field: str | None = None
    """Field holding the expected label (classification)."""
    extract: Literal["first_word", "label_set"] = "first_word"
    """How a prediction is read from the generation: its first word, or the first label of the label set it starts with."""
    max_new_tokens: PositiveInt | Auto = "auto"
    """Tokens generated per prompt; "auto": the longest label."""
    batch_size: PositiveInt = 64
    """Prompts per generation batch."""
    samples: NonNegativeInt = 5
    """Held-out prompts whose generations are shown in the report."""
    tasks: Annotated[tuple[str, ...], Field(strict=False)] = ()
    """kind = "harness": lm-evaluation-harness task (or group) names, as `lm_eval --tasks` takes them."""
    task_dirs: Annotated[tuple[str, ...], Field(strict=False)] = ()
    """kind = "harness": folders of your own task YAML files (relative to the recipe), searched
    before the harness's own tasks."""
    num_fewshot: NonNegativeInt | None = None
    """kind = "harness": few-shot examples per prompt (default: each task's own)."""
    limit: PositiveInt | None = None
    """kind = "harness": at most this many examples per task (default: all)."""

    @model_validator(mode="after")
    def _label(self) -> EvalSection:
        if self.kind == "classification" and self.label_field is None:
            raise ValueError('kind = "classification" needs label_field = "<field holding the label>"')
        if self.kind == "harness" and not self.tasks:
            raise ValueError('kind = "harness" needs tasks = ["<lm-evaluation-harness task>", ...]')
        harness_only = [key for key in ("tasks", "task_dirs", "num_fewshot", "limit") if key in self.model_fields_set]
        if self.kind != "harness" and harness_only:
            raise ValueError(f"{', '.join(harness_only)} set the lm-evaluation-harness run of kind = \"harness\"; "
                             f'this eval is kind = "{self.kind}" (set kind = "harness", or remove them)')
        return self
