"""Rules about the model, the tokenizer, pinned assets, adapters and hardware.

Each rule takes a `Context` and returns diagnostics; none sets defaults.
"""

from __future__ import annotations

from typing import Callable

from compiler.diagnostics import Diagnostic
from compiler.estimation.catalog import ModelFacts, hardware_catalog, load_accelerator
from compiler.estimation.families import FAMILIES
from compiler.estimation.params import architecture, linear_names
from compiler.loading.loader import LoadedRecipe
from compiler.loading.recipe import FreezeAdapter, FullAdapter, LoraAdapter, PretrainedModel, Recipe, ScratchModel
from compiler.rules.context import Context, Key, model_facts, q, suggest, tokenizer_format


def check_model_and_hardware(ctx: Context) -> list[Diagnostic]:
    """Every problem of [model], [tokenizer], the pinned assets, the adapters and [hardware]."""
    facts, out = model_facts(ctx)
    out += _check_model(ctx, facts)
    for rule in RULES_WITHOUT_FACTS:
        out += rule(ctx)
    out += _check_adapters(ctx, facts)
    return out


def _check_model(ctx: Context, facts: ModelFacts | None) -> list[Diagnostic]:
    model, out = ctx.recipe.model, []
    if isinstance(model, PretrainedModel):
        if model.path is not None and not ctx.path(model.path).is_dir():
            out.append(ctx.error(f"model.path = {q(model.path)} is not a directory", ("model", "path"),
                                 "paths are relative to the recipe file"))
        if facts is not None and facts.family == "chatglm" and not model.trust_remote_code:
            out.append(ctx.error(
                f"{facts.name} ships its own modelling code, which runs only with trust_remote_code = true",
                ("model",),
                "review the checkpoint's Python files, then set trust_remote_code = true in [model]",
            ))
        if model.quantization != "none":
            for key, adapter in _adapters(ctx.recipe):
                if isinstance(adapter, (FullAdapter, FreezeAdapter)):
                    out.append(ctx.error(
                        f'model.quantization = "{model.quantization}" freezes the base weights, '
                        f'but {".".join(map(str, key))} trains them ({adapter.kind})',
                        key if key != ("adapter",) or "adapter" in ctx.loaded.text else ("model", "quantization"),
                        'use kind = "lora" or "prefix", or quantization = "none"',
                    ))
    out += _check_attention(ctx, facts)
    tokens = ctx.recipe.tokens.max_total
    if facts is not None and isinstance(model, PretrainedModel) and isinstance(tokens, int):
        if tokens > facts.max_positions:
            out.append(ctx.error(
                f"tokens.max_total = {tokens} exceeds the context length of {facts.name} ({facts.max_positions})",
                ("tokens", "max_total"),
                f"set tokens.max_total to at most {facts.max_positions}",
            ))
    if isinstance(model, ScratchModel) and isinstance(model.n_positions, int) and isinstance(tokens, int):
        if tokens > model.n_positions:
            out.append(ctx.error(
                f"tokens.max_total = {tokens} exceeds model.n_positions = {model.n_positions}",
                ("tokens", "max_total"),
                'set model.n_positions = "auto" to size the model from the budget',
            ))
    return out


def _check_attention(ctx: Context, facts: ModelFacts | None) -> list[Diagnostic]:
    """SDPA cannot soft-cap attention scores, so transformers refuses it for Gemma-2 (and any model
    whose config soft-caps them would be computed without the cap)."""
    if facts is None or ctx.recipe.hardware.attention != "sdpa":
        return []
    cap = facts.config.get("attn_logit_softcapping")
    if not cap and facts.family != "gemma2":
        return []
    why = f"soft-caps its attention scores (attn_logit_softcapping = {cap})" if cap else "is a Gemma-2 model"
    written = "attention" in ctx.recipe.hardware.model_fields_set
    return [ctx.error(
        f"{facts.name} {why}, which torch's scaled_dot_product_attention cannot compute, so transformers "
        f'loads it only with eager attention or flash_attention_2; hardware.attention = "sdpa"'
        f'{"" if written else " (the default)"} would fail when training starts',
        ("hardware", "attention") if written else ("hardware",),
        'set attention = "eager" in [hardware] (or "flash_attention_2" on cuda; the plan counts eager\'s '
        "[heads, seq, seq] scores in every layer)",
    )]


def _check_tokenizer(ctx: Context) -> list[Diagnostic]:
    r, out = ctx.recipe, []
    tok = r.tokenizer
    if isinstance(r.model, ScratchModel) and (tok is None or (tok.asset, tok.path, tok.hub) == (None, None, None)):
        return [ctx.error(
            "a model trained from scratch needs a tokenizer",
            ("tokenizer",) if tok else ("model",),
            'add [tokenizer] with asset = "gpt2-bpe" (or path = "..."), special_tokens and eos_token',
        )]
    if tok is None:
        return []
    if tok.path is not None and not ctx.path(tok.path).exists():
        out.append(ctx.error(f"tokenizer.path = {q(tok.path)} not found", ("tokenizer", "path"),
                             "paths are relative to the recipe file"))
    if tokenizer_format(tok, ctx.assets) == "tiktoken":
        if tok.eos_token is None:
            out.append(ctx.error("a tiktoken tokenizer needs eos_token", ("tokenizer",),
                                 'add eos_token = "<|endoftext|>" and list it in special_tokens'))
        elif tok.eos_token not in tok.special_tokens:
            out.append(ctx.error(
                f"tokenizer.eos_token = {q(tok.eos_token)} is not in tokenizer.special_tokens",
                ("tokenizer", "eos_token"),
                f'add {{ "{tok.eos_token}" = ID }} to tokenizer.special_tokens',
            ))
    if tok.pad_token is not None and tok.special_tokens and tok.pad_token not in tok.special_tokens:
        out.append(ctx.error(f"tokenizer.pad_token = {q(tok.pad_token)} is not in tokenizer.special_tokens",
                             ("tokenizer", "pad_token")))
    return out


def _check_assets(ctx: Context) -> list[Diagnostic]:
    r = ctx.recipe
    wanted: list[tuple[Key, str]] = []
    if r.tokenizer is not None and r.tokenizer.asset is not None:
        wanted.append((("tokenizer", "asset"), r.tokenizer.asset))
    if isinstance(r.model, PretrainedModel) and r.model.asset is not None:
        wanted.append((("model", "asset"), r.model.asset))
    for name, ds in r.data.items():
        if ds.source.asset is not None:
            wanted.append((("data", name, "source", "asset"), ds.source.asset))
    return [
        ctx.error(f"{'.'.join(map(str, key))} = {q(name)} is not a pinned asset", key,
                  suggest(name, ctx.assets, "known assets"))
        for key, name in wanted
        if name not in ctx.assets
    ]


# ---------------------------------------------------------------------------------------------
# adapters


def _adapters(recipe: Recipe) -> list[tuple[Key, object]]:
    out: list[tuple[Key, object]] = [(("adapter",), recipe.adapter)]
    out += [(("stages", i, "adapter"), s.adapter) for i, s in enumerate(recipe.stages) if s.adapter is not None]
    return out


def _check_adapters(ctx: Context, facts: ModelFacts | None) -> list[Diagnostic]:
    if facts is None or not facts.modelled:
        return []  # a family without formulas: compile checks its meta model's module names
    out = []
    experts = FAMILIES[facts.family].expert_parameters
    for key, adapter in _adapters(ctx.recipe):
        if isinstance(adapter, LoraAdapter) and isinstance(adapter.targets, list):
            known = linear_names(architecture(facts))
            for i, target in enumerate(adapter.targets):
                if target not in known and target in experts:
                    out.append(ctx.error(
                        f"{'.'.join(map(str, key))}.targets names {q(target)}: in {facts.family} the routed experts' "
                        f"{target} is one 3-D tensor for all experts, not a linear layer, so LoRA cannot target it",
                        key + ("targets",),
                        f'move it to expert_targets = ["{target}"] (one LoRA pair per expert), or target the '
                        f"attention projections ({', '.join(known)})",
                    ))
                elif target not in known:
                    out.append(ctx.error(
                        f"{'.'.join(map(str, key))}.targets names {q(target)}, which is not a linear layer of "
                        f"{facts.family} blocks",
                        key + ("targets",),
                        suggest(target, known, f"{facts.family} linear layers"),
                    ))
        if isinstance(adapter, LoraAdapter):
            out += _check_expert_targets(ctx, key, adapter, facts.family, experts)
        if isinstance(adapter, FreezeAdapter):
            layers = adapter.trainable_layers
            too_many = layers > facts.num_layers if isinstance(layers, int) else any(i >= facts.num_layers for i in layers)
            if too_many:
                out.append(ctx.error(
                    f"{'.'.join(map(str, key))}.trainable_layers = {layers} but the model has {facts.num_layers} layers "
                    f"(indices 0..{facts.num_layers - 1})",
                    key + ("trainable_layers",),
                ))
            for name in adapter.trainable_modules:
                if name not in facts.block_submodules and name not in facts.linear_modules:
                    out.append(ctx.error(
                        f"{'.'.join(map(str, key))}.trainable_modules names {q(name)}, which is not part of a "
                        f"{facts.family} block",
                        key + ("trainable_modules",),
                        suggest(name, facts.block_submodules + facts.linear_modules, "modules"),
                    ))
    return out


def _check_expert_targets(ctx: Context, key: Key, adapter: LoraAdapter, model: str,
                          experts: tuple[str, ...]) -> list[Diagnostic]:
    """adapter.expert_targets names routed-expert tensors the model has."""
    return [expert_target_error(ctx.loaded, key, target, model, experts)
            for target in adapter.expert_targets if target not in experts]


def expert_target_error(loaded: LoadedRecipe, key: Key, target: str, model: str, experts: tuple[str, ...]) -> Diagnostic:
    """The diagnostic for an expert_targets entry that names no routed-expert tensor of `model`."""
    where = f"{'.'.join(map(str, key))}.expert_targets"
    if not experts:
        return Diagnostic("error", f"{where} names {q(target)}, but {model} has no routed experts stored as 3-D "
                          "tensors", help="remove expert_targets (it is for mixtures of experts)",
                          **loaded.where(key + ("expert_targets",)))
    return Diagnostic("error", f"{where} names {q(target)}, which is not a routed-expert tensor of {model}",
                      help=suggest(target, experts, "its expert tensors"), **loaded.where(key + ("expert_targets",)))


# ---------------------------------------------------------------------------------------------
# hardware


def _check_hardware(ctx: Context) -> list[Diagnostic]:
    hw, out = ctx.recipe.hardware, []
    if hw.gpu is not None:
        if hw.device != "cuda":
            out.append(ctx.error(f'hardware.gpu = {q(hw.gpu)} needs hardware.device = "cuda"', ("hardware", "gpu")))
        if hw.gpu not in hardware_catalog():
            out.append(ctx.error(f"hardware.gpu = {q(hw.gpu)} is not in the hardware catalog (specs/hardware)",
                                 ("hardware", "gpu"), suggest(hw.gpu, hardware_catalog(), "GPUs")))
        elif hw.precision == "bf16" and not load_accelerator(hw.gpu).bf16_supported:
            out.append(ctx.error(f"{hw.gpu} has no bf16 support", ("hardware", "precision"),
                                 'use precision = "fp16" (with loss scaling) or "fp32"'))
    elif hw.device == "cuda":
        out.append(ctx.warning("hardware.gpu is not set: the plan cannot check memory or estimate time and cost",
                               ("hardware", "device"), 'add gpu = "h100-sxm-80gb" (see specs/hardware)'))
    if hw.zero_stage > 0 and hw.nodes * hw.nproc_per_node == 1 and not (hw.offload_optimizer or hw.offload_params):
        out.append(ctx.warning(f"zero_stage = {hw.zero_stage} with a single process shards nothing",
                               ("hardware", "zero_stage"), "use more processes, enable offload, or zero_stage = 0"))
    return out


RULES_WITHOUT_FACTS: tuple[Callable[[Context], list[Diagnostic]], ...] = (_check_assets, _check_tokenizer, _check_hardware)
