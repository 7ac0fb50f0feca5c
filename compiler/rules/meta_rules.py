"""Compile-time checks against the model transformers builds on the meta device.

`recipe validate` checks adapters against the family table; compile goes further for a config the
catalog's tests have not verified (a hub or local config.json): it builds the model on the meta
device (torch and transformers imported here, lazily), checks the closed-form count against it,
plans a family without formulas from its counts, and checks LoRA targets and freeze modules
against that model's real module names.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.diagnostics import Diagnostic, RecipeError
from compiler.estimation.catalog import ModelFacts
from compiler.estimation.params import MetaCount, architecture, parameters
from compiler.loading.loader import LoadedRecipe
from compiler.loading.recipe import FreezeAdapter, LoraAdapter, PretrainedModel, Recipe
from compiler.rules.context import Key, q, suggest
from compiler.rules.model_rules import expert_target_error

# The memory and FLOP terms a family without formulas is planned with.
GENERIC_TERMS = (
    "parameters, embedding and per-block counts: the model built on the meta device (exact)",
    "LoRA and freeze counts: the first block's linear layers, repeated over every block",
    "activations: the Llama-block coefficients with the config's hidden, intermediate and key/value widths",
    "FLOPs: 6 x active parameters per token plus the attention term; in a mixture of experts, the routed "
    "experts of each block are counted from the meta model's expert tensors and the config's num_experts_per_tok "
    "(without it, every parameter counts as active)",
)


@dataclass(frozen=True)
class MetaCheck:
    """What compile learnt from the meta model, for the plan."""

    checked: bool  # a meta model was built and agreed with (or replaced) the formulas
    generic: bool  # the counts are the meta model's own (no formulas for this family)


def needs_meta_model(recipe: Recipe, facts: ModelFacts) -> bool:
    """A pretrained model whose config no catalog test verified, whose code transformers ships."""
    model = recipe.model
    return isinstance(model, PretrainedModel) and facts.parameters is None and not model.trust_remote_code


def _adapters(recipe: Recipe) -> list[tuple[Key, object]]:
    out: list[tuple[Key, object]] = [(("adapter",), recipe.adapter)]
    out += [(("stages", i, "adapter"), s.adapter) for i, s in enumerate(recipe.stages) if s.adapter is not None]
    return out


def check_adapters_against(loaded: LoadedRecipe, facts: ModelFacts, linear: tuple[str, ...],
                           submodules: tuple[str, ...], experts: tuple[str, ...]) -> list[Diagnostic]:
    """LoRA targets and freeze modules that the built model does not have, with did-you-mean."""
    out = []
    for key, adapter in _adapters(loaded.recipe):
        name = ".".join(map(str, key))
        if isinstance(adapter, LoraAdapter) and isinstance(adapter.targets, list):
            for target in adapter.targets:
                if target in linear:
                    continue
                if target in experts:
                    message = (f"{name}.targets names {q(target)}: in {facts.name} the routed experts' {target} is a "
                               "3-D tensor, not a linear layer, so LoRA cannot target it")
                    help_ = (f'move it to expert_targets = ["{target}"] (one LoRA pair per expert), or target the '
                             "attention projections (and a shared expert's linears)")
                else:
                    message = f"{name}.targets names {q(target)}, which is not a linear layer of {facts.name}'s blocks"
                    help_ = suggest(target, linear, "its linear layers")
                out.append(Diagnostic("error", message, help=help_, **loaded.where(key + ("targets",))))
        if isinstance(adapter, LoraAdapter):
            out += [expert_target_error(loaded, key, target, facts.name, experts)
                    for target in adapter.expert_targets if target not in experts]
        if isinstance(adapter, FreezeAdapter):
            for module in adapter.trainable_modules:
                if module not in submodules and module not in linear:
                    out.append(Diagnostic(
                        "error", f"{name}.trainable_modules names {q(module)}, which is not part of {facts.name}'s blocks",
                        help=suggest(module, submodules + linear, "modules"),
                        **loaded.where(key + ("trainable_modules",))))
    return out


def check_with_meta_model(loaded: LoadedRecipe, facts: ModelFacts) -> tuple[MetaCount | None, MetaCheck]:
    """None when the formulas stand, or for a family without formulas (or a formula the meta model
    contradicts) the meta model's counts to plan with. Raises RecipeError for a config transformers
    cannot build or adapter names its blocks lack."""
    if not needs_meta_model(loaded.recipe, facts):
        return None, MetaCheck(checked=False, generic=False)
    from compiler.estimation.meta_model import MetaModelError, meta_model

    try:
        built = meta_model(facts)
    except MetaModelError as exc:
        raise RecipeError.single(str(exc), **loaded.where(("model",))) from None
    problems = check_adapters_against(loaded, facts, built.linear_modules, built.block_submodules,
                                      built.expert_parameters)
    if problems:
        raise RecipeError(problems)
    # the meta model is the language model alone (a multimodal config's text_config)
    if facts.modelled and parameters(architecture(facts)).text == built.count.total:
        return None, MetaCheck(checked=True, generic=False)
    return built.count, MetaCheck(checked=True, generic=True)
