"""Which network is trained: its architecture, weights, tokenizer and adapter."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from compiler.loading.spec.base import Auto, NonNegativeInt, PositiveInt, Probability, Section, exactly_one


class ScratchModel(Section):
    """A GPT-2-class decoder initialised with random weights."""

    init: Literal["scratch"]
    """`scratch`: random weights; `pretrained`: start from an existing checkpoint."""
    architecture: Literal["gpt2"] = "gpt2"
    """Architecture family of the new model."""
    n_embd: PositiveInt
    """Hidden size (width of the residual stream). Must be divisible by n_head."""
    n_layer: PositiveInt
    """Number of transformer blocks."""
    n_head: PositiveInt
    """Attention heads per block."""
    n_positions: PositiveInt | Auto = "auto"
    """Context length. "auto" sizes it from the measured token budget ([tokens] max_total)."""
    dropout: Probability = 0.1
    """Dropout on embeddings, attention and residual paths (0 disables)."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ScratchModel:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"e.g. n_head = {nearest_divisor(self.n_embd, self.n_head)}"
            )
        return self


def nearest_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d))


class PretrainedModel(Section):
    """An existing checkpoint. Its architecture facts come from the model catalog (specs/models)
    or from a config.json, so planning works without downloading weights."""

    init: Literal["pretrained"]
    """`scratch`: random weights; `pretrained`: start from an existing checkpoint."""
    hub: str | None = None
    """Hugging Face hub repository, e.g. "Qwen/Qwen2-7B-Instruct" (downloaded by the runtime)."""
    revision: str | None = None
    """Hub revision (commit hash or tag) to pin; recommended for reproducible builds."""
    path: str | None = None
    """Local directory holding the checkpoint in Hugging Face format, relative to the recipe file."""
    asset: str | None = None
    """Pinned weights asset from specs/assets.toml (e.g. a GGUF file)."""
    catalog: str | None = None
    """Model catalog entry (a file name under specs/models without .toml) giving the architecture."""
    config: str | None = None
    """Path to a config.json giving the architecture, relative to the recipe file."""
    trust_remote_code: bool = False
    """Allow the checkpoint's own Python code to run (needed by e.g. ChatGLM3). Review that code first."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """Load the frozen base weights quantized (bitsandbytes); only with a LoRA or prefix adapter."""

    @model_validator(mode="after")
    def _one_source(self) -> PretrainedModel:
        exactly_one(self, ("hub", "path", "asset"), "[model]")
        if self.catalog is not None and self.config is not None:
            raise ValueError('give catalog = "..." or config = "...", not both')
        return self


ModelSection = Annotated[Union[ScratchModel, PretrainedModel], Field(discriminator="init")]


class TokenizerSection(Section):
    """The tokenizer. Omit the section for a pretrained model to use the model's own."""

    asset: str | None = None
    """Pinned tokenizer asset from specs/assets.toml."""
    path: str | None = None
    """Local directory with tokenizer.json (Hugging Face format), relative to the recipe file."""
    hub: str | None = None
    """Hub repository to take the tokenizer from."""
    format: Literal["tiktoken", "huggingface", "gguf"] | None = None
    """File format; inferred from the asset or path when omitted."""
    special_tokens: dict[str, int] = Field(default_factory=dict)
    """Extra special tokens and their ids, e.g. { "<|endoftext|>" = 50256 } (tiktoken ranks only)."""
    eos_token: str | None = None
    """End-of-sequence token; defaults to the tokenizer's own."""
    pad_token: str | None = None
    """Padding token; defaults to eos_token."""

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerSection:
        given = [n for n in ("asset", "path", "hub") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of asset, path or hub in [tokenizer] (found {', '.join(given)})")
        return self


class FullAdapter(Section):
    """Train every weight."""

    kind: Literal["full"]
    """full, lora, prefix (P-tuning v2) or freeze."""


class LoraAdapter(Section):
    """Low-rank adapters on chosen linear layers; the base weights stay frozen."""

    kind: Literal["lora"]
    """full, lora, prefix (P-tuning v2) or freeze."""
    rank: PositiveInt = 8
    """Rank r of each update matrix pair (A: r x in, B: out x r)."""
    alpha: PositiveInt = 16
    """Scaling numerator: updates are scaled by alpha / rank."""
    dropout: Probability = 0.0
    """Dropout applied to the adapter input."""
    targets: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, e.g. ["q_proj", "v_proj"], or "all-linear" for every linear layer in the blocks."""
    expert_targets: list[str] = []
    """Routed-expert tensors of a mixture of experts to adapt, one LoRA pair per expert, e.g. ["gate_up_proj", "down_proj"] (peft's target_parameters; needs dropout = 0)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained alongside the adapters."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(rank) instead of alpha / rank."""
    merge: bool = False
    """Also save a merged full model next to the adapter."""

    @model_validator(mode="after")
    def _targets_not_empty(self) -> LoraAdapter:
        if isinstance(self.targets, list) and not self.targets:
            raise ValueError('targets is empty; name modules like ["q_proj", "v_proj"] or use "all-linear"')
        if self.expert_targets and self.dropout:
            raise ValueError("expert_targets adapts the experts' 3-D tensors through peft's target_parameters, "
                             "which works only without dropout; set dropout = 0")
        return self


class PrefixAdapter(Section):
    """Prefix tuning / P-tuning v2: trained key/value prefixes in every layer; the model stays frozen."""

    kind: Literal["prefix"]
    """full, lora, prefix (P-tuning v2) or freeze."""
    num_virtual_tokens: PositiveInt
    """Length of the trained prefix (ChatGLM's pre_seq_len), e.g. 128."""
    projection: bool = False
    """Reparameterise the prefix through a two-layer MLP while training."""
    projection_hidden_size: PositiveInt | None = None
    """Hidden width of that MLP; defaults to the key/value width."""

    @model_validator(mode="after")
    def _projection_size(self) -> PrefixAdapter:
        if self.projection_hidden_size is not None and not self.projection:
            raise ValueError("projection_hidden_size is set but projection = false; set projection = true")
        return self


class FreezeAdapter(Section):
    """Freeze the model except its last layers (and optionally named modules)."""

    kind: Literal["freeze"]
    """full, lora, prefix (P-tuning v2) or freeze."""
    trainable_layers: PositiveInt | list[NonNegativeInt] = 2
    """How many of the last blocks train (an integer), or the block indices that train (a list)."""
    trainable_modules: list[str] = Field(default_factory=list)
    """Limit training inside those blocks to these module names, e.g. ["mlp"]; empty: the whole block."""
    train_embeddings: bool = False
    """Also train the token embeddings and the output layer."""


AdapterSection = Annotated[
    Union[FullAdapter, LoraAdapter, PrefixAdapter, FreezeAdapter], Field(discriminator="kind")
]
