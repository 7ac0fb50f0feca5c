"""Cross-field rules about data sets, templates, the stage chain and the eval."""

from __future__ import annotations

import glob
from pathlib import Path

from compiler.data.templating import TemplateError, compile_template
from compiler.diagnostics import Diagnostic
from compiler.loading.loader import display_path
from compiler.loading.recipe import (
    CHAT_FORMATS,
    FORMAT_FIELDS,
    Dataset,
    DpoStage,
    FullAdapter,
    PpoStage,
    PretrainedModel,
    RewardStage,
    PretrainStage,
    SftStage,
    TemplateSection,
    stage_adapter,
    training,
)
from compiler.rules.context import Context, Key, dataset_fields, file_format, q, suggest, tokenizer_format

_DELIMITED = ("tsv", "csv")


def check_data_and_stages(ctx: Context) -> list[Diagnostic]:
    out = _check_stage_names(ctx)
    for name, ds in ctx.recipe.data.items():
        out += _check_dataset(ctx, name, ds)
        out += _check_template(ctx, name, ds)
    out += _check_stages(ctx)
    out += _check_eval(ctx)
    return out


def _check_dataset(ctx: Context, name: str, ds: Dataset) -> list[Diagnostic]:
    out, at = [], ("data", name)
    if ds.source.path is not None:
        pattern = str(ctx.path(ds.source.path))
        if not (glob.glob(pattern) if glob.has_magic(pattern) else Path(pattern).is_file()):
            out.append(ctx.error(f"data.{name}.source.path = {q(ds.source.path)} matches no file (looked at {display_path(Path(pattern))})",
                                 at + ("source", "path"), "paths are relative to the recipe file"))
    if ds.columns is not None and file_format(ds) not in (*_DELIMITED, "auto"):
        out.append(ctx.error(f"data.{name}.columns applies to TSV/CSV files, but this file is {file_format(ds)}",
                             at + ("columns",), "remove columns; JSON records name their own fields"))
    if ds.format != "columns":
        allowed = FORMAT_FIELDS[ds.format]
        for key in ds.fields:
            if key not in allowed:
                out.append(ctx.error(
                    f"data.{name}.fields renames to {q(key)}, which is not a field of format {q(ds.format)}",
                    at + ("fields", key), suggest(key, allowed, f"{ds.format} fields")))
    known = dataset_fields(ds)
    if known is not None:
        for i, derive in enumerate(ds.derive):
            earlier = (known - {d.name for d in ds.derive[i:]})
            if derive.source not in earlier:
                out.append(ctx.error(f"data.{name}.derive[{i}] reads {q(derive.source)}, which is not a field",
                                     at + ("derive", i, "from"), suggest(derive.source, earlier, "fields")))
        for field in ds.html_unescape:
            if field not in known:
                out.append(ctx.error(f"data.{name}.html_unescape names {q(field)}, which is not a field",
                                     at + ("html_unescape",), suggest(field, known, "fields")))
    return out


def _template_key(name: str, ds: Dataset) -> Key:
    return ("data", name, "template") if ds.template is not None else ("template",)


def _check_template(ctx: Context, name: str, ds: Dataset) -> list[Diagnostic]:
    template = ds.template or ctx.recipe.template
    if template is None:
        return [ctx.error(f"data set {q(name)} has no template", ("data", name),
                          f"add a [template] section, or [data.{name}.template]")]
    at = _template_key(name, ds)
    out: list[Diagnostic] = []
    is_chat_data = ds.format in CHAT_FORMATS
    if is_chat_data and template.chat is None:
        return [ctx.error(f"data set {q(name)} holds conversations ({ds.format}) but the template is prompt/completion",
                          at, 'use a chat template: chat = "chatml" (or llama3, chatglm3, tokenizer)')]
    if template.chat is not None and ds.format == "columns":
        return [ctx.error(f"data set {q(name)} has free columns, which have no roles for chat = {q(template.chat)}",
                          at + ("chat",), 'write prompt and completion templates, or use format = "completion"')]
    if template.chat is not None and template.loss == "completion":
        out.append(ctx.error('template.loss = "completion" applies to prompt/completion templates',
                             at + ("loss",), 'with a chat template use "assistant", "last_assistant" or "all"'))
    if template.chat is None and template.loss in ("assistant", "last_assistant"):
        out.append(ctx.error(f'template.loss = "{template.loss}" needs a chat template',
                             at + ("loss",), 'use loss = "completion", or chat = "chatml"'))
    tok = ctx.recipe.tokenizer
    if template.chat == "tokenizer" and tok is not None and tokenizer_format(tok, ctx.assets) == "tiktoken":
        out.append(ctx.error('chat = "tokenizer" needs a tokenizer that carries a chat template; tiktoken ranks do not',
                             at + ("chat",), 'name a built-in template such as chat = "chatml"'))
    if template.chat is not None:
        if ctx.recipe.tokens.truncatable:
            out.append(ctx.error(
                f"tokens.truncatable names fields, but data set {q(name)} is rendered with a chat template, whose "
                "conversations are never cut by field", ("tokens", "truncatable"),
                'remove tokens.truncatable, or size tokens.max_total (and tokens.overflow) for whole conversations'))
        return out
    variables: dict[str, frozenset[str]] = {}
    for part in ("prompt", "completion"):
        source, key = _template_source(ctx, template, part, at)
        if key is None:
            if part == "completion" and ds.format == "prompt":
                continue  # prompt-only data (ppo rollouts) has nothing to complete
            out.append(ctx.error(f"the template has no {part}", at, f"add {part} = \"...\" (or {part}_file)"))
            continue
        if source is None:
            out.append(ctx.error(f"{'.'.join(map(str, key))} = {q(getattr(template, f'{part}_file'))} not found",
                                 key, "paths are relative to the recipe file"))
            continue
        try:
            variables[part] = compile_template(source).variables
        except TemplateError as exc:
            out.append(ctx.error(f"{'.'.join(map(str, key))}: {exc}", key))
    known = dataset_fields(ds)
    if known is not None:
        for part, names in variables.items():
            for var in sorted(names - known):
                out.append(ctx.error(
                    f"template.{part} uses {{{{ {var} }}}} but data set {q(name)} has no field {q(var)}",
                    at + (part,), suggest(var, known, "fields available")))
    unknown = known is not None and any(names - known for names in variables.values())
    for var in [] if unknown else ctx.recipe.tokens.truncatable:  # a misspelt field is reported once, above
        if "prompt" in variables and var not in variables["prompt"] and var not in variables.get("completion", ()):
            out.append(ctx.error(f"tokens.truncatable names {q(var)}, which template.prompt does not use",
                                 ("tokens", "truncatable"), suggest(var, variables["prompt"], "prompt fields")))
        if var in variables.get("completion", ()):
            out.append(ctx.error(
                f"tokens.truncatable names {q(var)}, which template.completion uses; the completion is never truncated",
                ("tokens", "truncatable"), f"remove {q(var)} from tokens.truncatable"))
    return out


def _template_source(ctx: Context, template: TemplateSection, part: str, at: Key) -> tuple[str | None, Key | None]:
    """(source text, key it came from); source None when the named file is missing."""
    inline, file = getattr(template, part), getattr(template, f"{part}_file")
    if inline is not None:
        return inline, at + (part,)
    if file is None:
        return None, None
    path = ctx.path(file)
    return (path.read_text(encoding="utf-8") if path.is_file() else None), at + (f"{part}_file",)


# ---------------------------------------------------------------------------------------------
# the stage chain


def _check_stage_names(ctx: Context) -> list[Diagnostic]:
    out, seen = [], set()
    for i, stage in enumerate(ctx.recipe.stages):
        if stage.name == "base":
            out.append(ctx.error("\"base\" names the recipe's [model]; give the stage another name",
                                 ("stages", i, "name")))
        elif stage.name in seen:
            out.append(ctx.error(f"two stages are named {q(stage.name)}; stage names must be unique",
                                 ("stages", i, "name")))
        seen.add(stage.name)
    return out


_NEEDS_PREFERENCE = "preference pairs (format = \"preference\": prompt, chosen, rejected)"


def _check_stages(ctx: Context) -> list[Diagnostic]:
    r, out = ctx.recipe, []
    names = [s.name for s in r.stages]
    hw = r.hardware
    world = hw.nodes * hw.nproc_per_node
    out += _check_batch(ctx, r.train, world, ("train",), "[train]", True)
    for i, stage in enumerate(r.stages):
        at = ("stages", i)
        earlier = names[:i]

        def reference(value: str | None, key: str, what: str) -> None:
            if value is None or value == "base" or value in earlier:
                return
            if value in names:
                out.append(ctx.error(f"stage {q(stage.name)}: {key} = {q(value)} runs later ({what} must come earlier)",
                                     at + (key,), "reorder [[stages]] or name an earlier stage"))
            else:
                out.append(ctx.error(f"stage {q(stage.name)}: {key} = {q(value)} is not a stage",
                                     at + (key,), suggest(value, ["base", *earlier], "choices")))

        reference(stage.start, "from", "the stage it starts from")
        if isinstance(stage, (DpoStage, PpoStage)):
            reference(stage.reference, "reference", "the reference model")
        if isinstance(stage, PpoStage):
            reference(stage.critic_from, "critic_from", "the critic's initial weights")
            out += _check_reward_model(ctx, i, stage, earlier)
            if stage.ptx_data is not None and stage.ptx_data not in r.data:
                out.append(ctx.error(f"stage {q(stage.name)}: ptx_data = {q(stage.ptx_data)} is not a data set",
                                     at + ("ptx_data",), suggest(stage.ptx_data, r.data, "data sets")))
        out += _check_stage_data(ctx, i)
        train = training(r, stage)
        out += _check_acts_on_evaluations(ctx, stage, train, at)
        batch_keys = ("micro_batch_size", "grad_accum", "global_batch_size")
        if any(getattr(stage, k) is not None for k in batch_keys):
            out += _check_batch(ctx, train, world, at, f"stage {q(stage.name)}", stage.global_batch_size is not None)
        adapter = stage_adapter(r, stage)
        if isinstance(r.model, PretrainedModel) and isinstance(adapter, FullAdapter) and stage.start == "base":
            if train.learning_rate > 1e-4 and not isinstance(stage, PretrainStage):
                if stage.learning_rate is not None:
                    key = at + ("learning_rate",)
                elif "learning_rate" in r.train.model_fields_set:
                    key = ("train", "learning_rate")
                else:
                    key = at  # the default learning rate: point at the stage that uses it
                out.append(ctx.warning(
                    f"stage {q(stage.name)}: learning_rate = {train.learning_rate:g} is high for full fine-tuning of "
                    "a pretrained model and may erase what it knows", key, "typical values are 1e-5 to 1e-4"))
    return out


def _check_acts_on_evaluations(ctx: Context, stage, train, at: Key) -> list[Diagnostic]:
    """save_best and early_stopping_patience act on the held-out evaluations during training, which
    only eval_every_steps schedules: without it they would silently do nothing."""
    out = []
    for key in ("save_best", "early_stopping_patience"):
        if getattr(train, key) and train.eval_every_steps is None:
            where = at + (key,) if getattr(stage, key) is not None else ("train", key)
            out.append(ctx.error(f"stage {q(stage.name)}: {key} needs eval_every_steps, the held-out evaluations "
                                 "it acts on", where, f"set train.eval_every_steps = N (or remove {key})"))
    return out


def _check_batch(ctx: Context, train, world: int, at: Key, who: str, own_global: bool) -> list[Diagnostic]:
    """global_batch_size, when given, must equal micro-batch x accumulation x processes."""
    if train.global_batch_size is None:
        return []
    product = train.micro_batch_size * train.grad_accum * world
    if product == train.global_batch_size:
        return []
    key = at + ("global_batch_size",) if own_global else ("train", "global_batch_size")
    return [ctx.error(
        f"{who}: global_batch_size = {train.global_batch_size} but micro_batch_size {train.micro_batch_size} "
        f"x grad_accum {train.grad_accum} x {world} process(es) = {product}",
        key, _batch_help(train.global_batch_size, train.micro_batch_size, world))]


def _batch_help(global_batch: int, micro: int, world: int) -> str:
    accum, rest = divmod(global_batch, micro * world)
    if accum and not rest:
        return f"set grad_accum = {accum}"
    return "make global_batch_size a multiple of micro_batch_size x processes, or drop it"


def _check_reward_model(ctx: Context, i: int, stage: PpoStage, earlier: list[str]) -> list[Diagnostic]:
    at = ("stages", i, "reward_model")
    by_name = {s.name: s for s in ctx.recipe.stages}
    target = by_name.get(stage.reward_model)
    if target is None:
        rewards = [s.name for s in ctx.recipe.stages if isinstance(s, RewardStage)]
        return [ctx.error(f"stage {q(stage.name)}: reward_model = {q(stage.reward_model)} is not a stage", at,
                          suggest(stage.reward_model, rewards, "reward stages"))]
    if stage.reward_model not in earlier:
        return [ctx.error(f"stage {q(stage.name)}: reward_model = {q(stage.reward_model)} runs later", at,
                          "put the reward stage before the ppo stage")]
    if not isinstance(target, RewardStage):
        article = "an" if target.kind[0] in "aeiosu" else "a"
        return [ctx.error(f"stage {q(stage.name)}: reward_model = {q(stage.reward_model)} is {article} {target.kind} stage, "
                          "not a reward stage", at, 'name a stage with kind = "reward"')]
    return []


def _check_stage_data(ctx: Context, i: int) -> list[Diagnostic]:
    r = ctx.recipe
    stage = r.stages[i]
    at = ("stages", i)
    if stage.data is None:
        if len(r.data) > 1:
            return [ctx.error(f"stage {q(stage.name)} does not say which data set it trains on",
                              at, f"add data = \"{next(iter(r.data))}\" (one of: {', '.join(r.data)})")]
        name = next(iter(r.data))
    elif stage.data not in r.data:
        return [ctx.error(f"stage {q(stage.name)}: data = {q(stage.data)} is not a data set", at + ("data",),
                          suggest(stage.data, r.data, "data sets"))]
    else:
        name = stage.data
    fmt = r.data[name].format
    key = at + ("data",) if stage.data is not None else at + ("kind",)
    problem = None
    if isinstance(stage, (SftStage, PretrainStage)) and fmt in ("preference", "prompt"):
        problem = f"has no target text to learn ({fmt}); use completion, instruction, chat or columns data"
    if isinstance(stage, DpoStage) and fmt != "preference":
        problem = f"is {fmt}, but dpo needs {_NEEDS_PREFERENCE}"
    if isinstance(stage, RewardStage):
        if stage.objective == "pairwise" and fmt != "preference":
            problem = f"is {fmt}, but a pairwise reward model needs {_NEEDS_PREFERENCE}; or set objective = \"regression\""
        if stage.objective == "regression":
            known = dataset_fields(r.data[name])
            if known is not None and stage.score_field not in known:
                problem = f"has no field {q(stage.score_field)} to regress on (score_field)"
    if isinstance(stage, PpoStage) and fmt in CHAT_FORMATS:
        problem = f"is {fmt}; ppo samples from prompts: use format = \"prompt\" (user_input) or another single-turn format"
    if problem:
        return [ctx.error(f"stage {q(stage.name)} ({stage.kind}): data set {q(name)} {problem}", key)]
    return []


def _check_eval(ctx: Context) -> list[Diagnostic]:
    r = ctx.recipe
    ev = r.eval
    if ev is None:
        return []
    out = []
    if ev.stage is not None and ev.stage not in [s.name for s in r.stages]:
        out.append(ctx.error(f"eval.stage = {q(ev.stage)} is not a stage", ("eval", "stage"),
                             suggest(ev.stage, [s.name for s in r.stages], "stages")))
    if ev.data is not None and ev.data not in r.data:
        out.append(ctx.error(f"eval.data = {q(ev.data)} is not a data set", ("eval", "data"),
                             suggest(ev.data, r.data, "data sets")))
        return out
    target = next((s for s in r.stages if s.name == (ev.stage or r.stages[-1].name)), None)
    if isinstance(target, RewardStage):
        out.append(ctx.error(f"eval would evaluate stage {q(target.name)}, a reward model; its held-out accuracy is "
                             "measured when it trains and shown in the run report",
                             ("eval", "stage") if ev.stage else ("eval",),
                             "set eval.stage to a stage that trains a language model (sft, dpo, ppo), or drop [eval]"))
    name = ev.data or (r.stages[-1].data or next(iter(r.data)))
    if name not in r.data:
        return out
    ds = r.data[name]
    if ds.format == "prompt":
        out.append(ctx.error(f"eval reads data set {q(name)}, whose rows are prompts only: there is no completion "
                             "to score", ("eval", "data") if ev.data else ("eval",),
                             "set eval.data to a data set with completions"))
    for i, folder in enumerate(ev.task_dirs):
        if not ctx.path(folder).is_dir():
            out.append(ctx.error(f"eval.task_dirs[{i}] = {q(folder)} is not a folder (paths are relative to the recipe)",
                                 ("eval", "task_dirs"), "give a folder of lm-evaluation-harness task YAML files"))
    if ev.kind == "classification":
        if ds.format in CHAT_FORMATS or ds.format == "preference":
            out.append(ctx.error(f'eval.kind = "classification" needs labelled rows, but data set {q(name)} is {ds.format}',
                                 ("eval", "kind"), 'use kind = "language_model"'))
        known = dataset_fields(ds)
        if known is not None and ev.label_field not in known:
            out.append(ctx.error(f"eval.label_field = {q(ev.label_field)} is not a field of data set {q(name)}",
                                 ("eval", "label_field"), suggest(ev.label_field, known, "fields")))
    return out
