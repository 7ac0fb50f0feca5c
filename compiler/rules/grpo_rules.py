"""Rules of the grpo stage: its rewards, the stages they name, and code a recipe may run."""

from __future__ import annotations

from compiler.diagnostics import Diagnostic
from compiler.loading.recipe import CHAT_FORMATS, GrpoStage, RewardStage, stage_dataset
from compiler.rules.context import Context, dataset_fields, q, suggest


def check_grpo_stages(ctx: Context) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    for i, stage in enumerate(ctx.recipe.stages):
        if isinstance(stage, GrpoStage):
            out += _check_stage(ctx, i, stage)
    return out


def _check_stage(ctx: Context, i: int, stage: GrpoStage) -> list[Diagnostic]:
    r = ctx.recipe
    at = ("stages", i)
    earlier = [s.name for s in r.stages[:i]]
    out: list[Diagnostic] = []
    if stage.reference is not None and stage.reference != "base" and stage.reference not in earlier:
        out.append(ctx.error(f"stage {q(stage.name)}: reference = {q(stage.reference)} is not an earlier stage",
                             at + ("reference",), suggest(stage.reference, ["base", *earlier], "choices")))
    if stage.reference is not None and stage.kl_coef == 0:
        out.append(ctx.error(f"stage {q(stage.name)}: reference = {q(stage.reference)} but kl_coef = 0, so no "
                             "reference is used", at + ("reference",), "set kl_coef > 0, or drop reference"))
    if stage.clip_eps >= 1:
        out.append(ctx.error(f"stage {q(stage.name)}: clip_eps = {stage.clip_eps:g} would allow a ratio of 0 or below",
                             at + ("clip_eps",), "use a value below 1 (0.2 is usual)"))
    name = stage_dataset(r, stage)
    if name not in r.data:
        return out  # the data rules report the unknown data set
    ds = r.data[name]
    if ds.format in CHAT_FORMATS:
        out.append(ctx.error(f"stage {q(stage.name)} (grpo): data set {q(name)} is {ds.format}; grpo samples from "
                             "prompts: use a single-turn format", at + ("data",) if stage.data else at + ("kind",)))
    known = dataset_fields(ds)
    derived = {d.name: d for d in ds.derive}
    for j, reward in enumerate(stage.rewards):
        where = at + ("rewards", j)
        field = getattr(reward, "field", None)
        if field is not None and known is not None and field not in known:
            out.append(ctx.error(f"stage {q(stage.name)}: reward {q(reward.name or reward.kind)} reads field {q(field)}, "
                                 f"which data set {q(name)} does not have", where + ("field",),
                                 suggest(field, known, "fields")))
        if reward.kind == "label_set" and reward.labels is None and field not in derived:
            out.append(ctx.error(f"stage {q(stage.name)}: label_set reward on {q(field)} needs its labels",
                                 where, f"add labels = [...], or derive {q(field)} with [[data.{name}.derive]]"))
        if reward.kind == "reward_model":
            target = next((s for s in r.stages if s.name == reward.stage), None)
            if reward.stage not in earlier:
                rewards = [s.name for s in r.stages[:i] if isinstance(s, RewardStage)]
                problem = "runs later" if target is not None else "is not a stage"
                out.append(ctx.error(f"stage {q(stage.name)}: reward_model reward names stage {q(reward.stage)}, "
                                     f"which {problem}", where + ("stage",),
                                     suggest(reward.stage, rewards, "earlier reward stages")))
            elif not isinstance(target, RewardStage):
                out.append(ctx.error(f"stage {q(stage.name)}: reward_model reward names stage {q(reward.stage)}, "
                                     f"a {target.kind} stage", where + ("stage",), 'name a stage with kind = "reward"'))
        if reward.kind == "python" and not r.allow_code:
            out.append(ctx.error(
                f"stage {q(stage.name)}: reward {q(reward.name or reward.kind)} runs Python code ({reward.function}), "
                "and this recipe does not allow code", where + ("function",),
                "only if you trust this recipe: add allow_code = true at the top level (the plan lists the code)"))
    return out
