"""Count a model's parameters exactly by building it on the meta device from its config.json.

transformers allocates no memory on the meta device, so a 70B model is built in seconds. The
counts check the closed-form formulas for configs the catalog's tests have not seen, and are the
counts themselves for architectures without formulas (the generic family). torch and
transformers are imported inside the functions: only compile and plan call them, never validate.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.estimation.catalog import ModelFacts
from compiler.estimation.params import MetaCount


class MetaModelError(Exception):
    """A config transformers cannot build; the message names the model type and the fix."""


@dataclass(frozen=True)
class MetaModel:
    """What the meta model tells the planner."""

    count: MetaCount
    linear_modules: tuple[str, ...]  # nn.Linear names inside the blocks (LoRA targets)
    block_submodules: tuple[str, ...]  # direct children of a block (freeze.trainable_modules)
    expert_parameters: tuple[str, ...]  # 3-D parameters inside the blocks (mixture-of-experts tensors)


def build_meta_model(facts: ModelFacts):
    """The transformers causal-LM for `facts.config`, on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(facts.config)
    model_type = config.pop("model_type")
    config.pop("architectures", None)
    config.pop("transformers_version", None)
    try:
        hf_config = AutoConfig.for_model(model_type, **config)
    except (ValueError, KeyError) as exc:
        raise MetaModelError(
            f"transformers does not implement model_type {model_type!r} of {facts.name} ({str(exc).splitlines()[0]}); "
            "upgrade transformers, or use a checkpoint of a supported architecture"
        ) from None
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except ValueError as exc:
        raise MetaModelError(f"{facts.name} ({model_type}) has no causal language-model class in transformers: "
                             f"{str(exc).splitlines()[0]}") from None


def _blocks(model):
    """The ModuleList of decoder blocks: the longest one in the model."""
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise MetaModelError(f"{type(model).__name__} has no list of decoder blocks")
    return max(lists, key=len)


def routed_experts(block) -> tuple[int, int] | None:
    """(routed experts, parameters of one) of a mixture-of-experts block, None for a dense one.

    transformers 5 stores a block's routed experts as 3-D tensors whose first dimension is the
    expert (DeepSeek-V2's `experts.gate_up_proj`, [experts, 2 x width, hidden]); older layouts keep
    an `experts` ModuleList of MLPs. Shared experts are ordinary linear layers, always active."""
    from torch import nn

    stacked = [p for p in block.parameters() if p.dim() == 3]
    if stacked:
        n = stacked[0].shape[0]
        return n, sum(p.numel() for p in stacked) // n
    for name, module in block.named_modules():
        if name.rsplit(".", 1)[-1] == "experts" and isinstance(module, nn.ModuleList) and len(module) > 0:
            return len(module), sum(p.numel() for p in module[0].parameters())
    return None


# config.json keys of the router's top-k, by the families that name it differently
_TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")


def experts_per_token(config: dict) -> int:
    """How many routed experts the router picks per token (0 when the config does not say)."""
    return next((int(config[k]) for k in _TOP_K_KEYS if isinstance(config.get(k), int)), 0)


def meta_model(facts: ModelFacts) -> MetaModel:
    """Exact counts and module names of `facts`' architecture."""
    from torch import nn

    model = build_meta_model(facts)
    total = sum(p.numel() for p in model.parameters())  # tied weights are yielded once
    seen: set[int] = set()
    embedding = 0
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and id(module.weight) not in seen:
            seen.add(id(module.weight))
            embedding += module.weight.numel()
    blocks = _blocks(model)
    first = blocks[0]
    linears = tuple(
        (name.rsplit(".", 1)[-1], m.in_features, m.out_features, m.bias is not None)
        for name, m in first.named_modules() if isinstance(m, nn.Linear)
    )
    every = tuple(
        (name.rsplit(".", 1)[-1], m.in_features, m.out_features, m.bias is not None)
        for block in blocks for name, m in block.named_modules() if isinstance(m, nn.Linear)
    )
    experts = {n.rsplit(".", 1)[-1] for block in blocks for n, p in block.named_parameters() if p.dim() == 3}
    names = {name for name, _, _, _ in every}
    routed = [r for r in (routed_experts(block) for block in blocks) if r is not None]
    shapes = tuple((n.rsplit(".", 1)[-1], *p.shape) for block in blocks for n, p in block.named_parameters()
                   if p.dim() == 3)
    count = MetaCount(total=total, embedding=embedding, per_layer=sum(p.numel() for p in first.parameters()),
                      linears=linears, all_linears=every, expert_tensors=bool(experts),
                      routed=tuple(routed), experts_per_token=experts_per_token(facts.config) if routed else 0,
                      expert_shapes=shapes)
    return MetaModel(count=count, linear_modules=tuple(sorted(names)),
                     block_submodules=tuple(n for n, _ in first.named_children()),
                     expert_parameters=tuple(sorted(experts)))
