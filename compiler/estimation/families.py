"""The decoder families the closed-form estimator models, keyed by config.json's model_type.

Each entry says how a family's blocks differ from the Llama block (query/key/value and
gate/up/down projections, two RMSNorms): fused projections, extra norms, per-head query/key
norms, biases, and mixture-of-experts layers. Module names are the ones transformers gives the
nn.Linear layers and block sub-modules, so LoRA targets and freeze modules can be checked against
them. Standard library only: `recipe validate` reads this table.

Architectures transformers implements but this table does not list are still planned: their
counts come from the model built on the meta device (`compiler.estimation.meta_model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

_SPLIT_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_SPLIT_MLP = ("gate_proj", "up_proj", "down_proj")
_LLAMA_SUBMODULES = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class Family:
    """How one family's decoder block is built."""

    name: str
    linear_modules: tuple[str, ...]  # nn.Linear names inside a block ("all-linear" adapts these)
    block_submodules: tuple[str, ...]  # sub-modules freeze.trainable_modules may name
    layout: str = "split"  # split (q/k/v + gate/up/down), fused (qkv_proj + gate_up_proj), gpt2, chatglm
    norms_per_block: int = 2  # RMSNorms of width hidden in one block
    qk_norm: str = "none"  # none; head (RMSNorm over head_dim on q and k); full (over q and kv widths)
    qkv_bias: bool | None = None  # None: config.attention_bias decides
    tied_default: bool = False  # tie_word_embeddings when config.json leaves it out
    moe: str = "none"  # none; mixtral (routed experts); qwen (routed experts, sparse step, dense layers)
    shared_expert: bool = False  # one always-on expert MLP with a sigmoid gate (Qwen1.5/Qwen2-MoE)
    frozen_by_default: tuple[str, ...] = field(default=())  # gates "all-linear" leaves frozen (name them to adapt)
    expert_parameters: tuple[str, ...] = field(default=())  # 3-D expert tensors (not nn.Linear)


_LLAMA = Family("llama", _SPLIT_ATTENTION + _SPLIT_MLP, _LLAMA_SUBMODULES)
_GEMMA_SUBMODULES = _LLAMA_SUBMODULES + ("pre_feedforward_layernorm", "post_feedforward_layernorm")
_MOE_SUBMODULES = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_EXPERTS = ("gate_up_proj", "down_proj")

FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", ("c_attn", "c_proj", "c_fc"), ("attn", "mlp", "ln_1", "ln_2"), layout="gpt2",
                   tied_default=True),
    "llama": _LLAMA,
    "mistral": Family("mistral", _LLAMA.linear_modules, _LLAMA_SUBMODULES),
    "qwen2": Family("qwen2", _LLAMA.linear_modules, _LLAMA_SUBMODULES, qkv_bias=True),
    "chatglm": Family("chatglm", ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
                      ("self_attention", "mlp", "input_layernorm", "post_attention_layernorm"), layout="chatglm"),
    "qwen3": Family("qwen3", _LLAMA.linear_modules, _LLAMA_SUBMODULES, qk_norm="head"),
    "smollm3": Family("smollm3", _LLAMA.linear_modules, _LLAMA_SUBMODULES),
    "gemma2": Family("gemma2", _LLAMA.linear_modules, _GEMMA_SUBMODULES, norms_per_block=4, tied_default=True),
    "gemma3_text": Family("gemma3_text", _LLAMA.linear_modules, _GEMMA_SUBMODULES, norms_per_block=4,
                          qk_norm="head", tied_default=True),
    "phi3": Family("phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), _LLAMA_SUBMODULES, layout="fused"),
    "olmo2": Family("olmo2", _LLAMA.linear_modules,
                    ("self_attn", "mlp", "post_attention_layernorm", "post_feedforward_layernorm"), qk_norm="full"),
    "mixtral": Family("mixtral", _SPLIT_ATTENTION, _MOE_SUBMODULES, moe="mixtral",
                      frozen_by_default=("gate",), expert_parameters=_EXPERTS),
    "qwen3_moe": Family("qwen3_moe", _SPLIT_ATTENTION + _SPLIT_MLP, _MOE_SUBMODULES, qk_norm="head", moe="qwen",
                        frozen_by_default=("gate",), expert_parameters=_EXPERTS),
    "qwen2_moe": Family("qwen2_moe", _SPLIT_ATTENTION + _SPLIT_MLP + ("shared_expert_gate",), _MOE_SUBMODULES,
                        qkv_bias=True, moe="qwen", shared_expert=True, frozen_by_default=("gate", "shared_expert_gate"),
                        expert_parameters=_EXPERTS),
}

# The family planned from the meta model alone (no closed-form terms).
GENERIC = "generic"


def all_linear_targets(family: str) -> tuple[str, ...] | None:
    """What "all-linear" adapts in a mixture of experts: its nn.Linear layers except the gates.
    None for a dense family, where peft's own "all-linear" already means exactly that."""
    fam = FAMILIES.get(family)
    if fam is None or fam.moe == "none":
        return None
    return tuple(n for n in fam.linear_modules if n not in fam.frozen_by_default)


def family_of(config: dict) -> str:
    """The family of a config.json (GENERIC for an architecture without formulas)."""
    model_type = config.get("model_type")
    return model_type if model_type in FAMILIES else GENERIC


def text_config(config: dict) -> dict:
    """The language model's own config: a multimodal Gemma-3 checkpoint nests it in text_config."""
    nested = config.get("text_config")
    if config.get("model_type") == "gemma3" and isinstance(nested, dict):
        merged = dict(nested)
        merged.setdefault("model_type", "gemma3_text")
        merged.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", True))
        return merged
    return config
