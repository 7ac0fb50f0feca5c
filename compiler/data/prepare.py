"""Prepare one data set for the build: read, split, render with its template, measure, tokenize.

The result holds the JSONL files the runtime reads and the facts the plan reports (lengths,
the budget and why, truncations, labels). Without a tokenizer at compile time (a hub model on a
machine without the hub) rows are written untokenized and the plan says lengths were not measured.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.data.assets import asset_path
from compiler.data.conversations import ChatTemplate, ConversationError, chat_template, conversation, segments
from compiler.data.read import Row, Split, apply_bad_rows_policy, check_rows, read_dataset, read_hub_rows, split_rows
from compiler.data.templating import TemplateError, compile_template
from compiler.data.token_budget import (
    BudgetError,
    BudgetRequest,
    Example,
    LengthStats,
    TemplateRowError,
    choose_max_total,
    histogram,
    plan_budget,
    token_profile,
)
from compiler.data.tokenizer import Encoder
from compiler.diagnostics import Diagnostic, RecipeError
from compiler.loading.loader import LoadedRecipe, display_path
from compiler.loading.recipe import Dataset, TemplateSection, dataset_template, stage_dataset
from compiler.rules.context import file_format, resolve_data_path
from runtime.contract.assets import AssetError, AssetSpec
from runtime.contract.config import TemplateSpec


@dataclass(frozen=True)
class PreparedData:
    name: str
    format: str
    source_label: str
    files: tuple[Path, ...]
    split: Split
    template: TemplateSpec
    measured: bool
    max_total_tokens: int
    budget: dict[str, Any]  # for the plan: the choice, its reason, lengths, truncations
    train_jsonl: bytes
    heldout_jsonl: bytes
    tokens_per_epoch: int  # real tokens in the training split (0 when not measured)
    supervised_per_epoch: int
    max_completion_tokens: int
    label_counts: dict[str, dict[str, int]] | None
    checks: dict[str, Any]  # problems found by category, and rows left out
    warnings: tuple[Diagnostic, ...] = ()

    @property
    def mean_seq_len(self) -> float:
        return self.tokens_per_epoch / max(1, len(self.split.train))

    @property
    def n_train(self) -> int:
        """Records in the training file (a preference pair is one)."""
        return self.train_jsonl.count(b"\n")

    @property
    def n_heldout(self) -> int:
        return self.heldout_jsonl.count(b"\n")


def source_files(loaded: LoadedRecipe, name: str, assets: dict[str, AssetSpec]) -> tuple[list[Path], str]:
    """The files a data set reads, and how to name them in messages."""
    ds = loaded.recipe.data[name]
    key = ("data", name, "source")
    if ds.source.asset is not None:
        try:
            path = asset_path(assets[ds.source.asset])
        except AssetError as exc:
            raise RecipeError.single(str(exc), **loaded.where(key + ("asset",))) from None
        return [path], f"asset:{ds.source.asset}/{path.name}"
    if ds.source.hub is not None:
        return [], f"hub:{ds.source.hub}"
    pattern = resolve_data_path(loaded.path, ds.source.path)
    paths = sorted(Path(p) for p in glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [pattern]
    return paths, display_path(pattern)


def _file_format(ds: Dataset, paths: list[Path]) -> str:
    fmt = file_format(ds)
    if fmt == "auto":
        fmt = paths[0].suffix.lower().lstrip(".")
    return fmt


def template_spec(loaded: LoadedRecipe, name: str, encoder: Encoder | None) -> tuple[TemplateSpec, ChatTemplate | None]:
    t: TemplateSection = dataset_template(loaded.recipe, name)
    where = ("data", name, "template") if loaded.recipe.data[name].template else ("template",)

    def read(part: str) -> str | None:
        inline, file = getattr(t, part), getattr(t, f"{part}_file")
        return inline if file is None else resolve_data_path(loaded.path, file).read_text(encoding="utf-8")

    chat = None
    if t.chat is not None:
        try:
            chat = chat_template(
                t.chat,
                encoder.chat_template if encoder else None,
                encoder.bos_token if encoder else None,
                encoder.eos_token if encoder else None,
            )
        except TemplateError as exc:
            raise RecipeError.single(str(exc), **loaded.where(where + ("chat",))) from None
    loss = t.loss if t.loss != "auto" else ("assistant" if t.chat else "completion")
    spec = TemplateSpec(
        prompt=read("prompt"),
        completion=read("completion"),
        chat=chat.source if chat else None,
        chat_name=t.chat,
        system=t.system,
        add_eos=t.add_eos,
        loss=loss,
    )
    return spec, chat


def prepare_dataset(
    loaded: LoadedRecipe,
    name: str,
    assets: dict[str, AssetSpec],
    encoder: Encoder | None,
    n_positions_cap: int | None,
    label_field: str | None,
) -> PreparedData:
    recipe = loaded.recipe
    ds = recipe.data[name]
    paths, label = source_files(loaded, name, assets)
    if ds.source.hub is not None:
        hub_rows = read_hub_rows(ds.source.hub, ds.source.hub_split, ds.source.revision)
        report = check_rows(hub_rows, ds, label)
    else:
        fmt = _file_format(ds, paths)
        if fmt not in ("tsv", "csv", "json", "jsonl", "parquet"):
            raise RecipeError.single(
                f"data set \"{name}\": cannot read {fmt or 'extension-less'} files ({label})",
                help='set file_format = "tsv", "csv", "json", "jsonl" or "parquet"',
                **loaded.where(("data", name)),
            )
        report = read_dataset(paths, ds, fmt, label)
    rows, check_warnings, checks = apply_bad_rows_policy(loaded, name, report)
    if not rows:
        raise RecipeError.single(f"{label} has no rows", **loaded.where(("data", name, "source")))
    split = split_rows(rows, ds.split.heldout_fraction, ds.split.seed)
    spec, chat = template_spec(loaded, name, encoder)
    labels = _label_counts(split, label_field) if label_field else None
    common = dict(name=name, format=ds.format, source_label=label, files=tuple(paths), split=split, template=spec,
                  label_counts=labels, checks=checks)
    if encoder is None:
        prepared = _unmeasured(loaded, common, split, n_positions_cap)
    elif chat is not None:
        prepared = _prepare_chat(loaded, common, split, encoder, chat, spec, n_positions_cap, label_field)
    else:
        prepared = _prepare_prompt_completion(loaded, common, split, encoder, spec, n_positions_cap, label_field)
    return dataclasses.replace(prepared, warnings=tuple(check_warnings) + prepared.warnings)


def _label_counts(split: Split, field: str) -> dict[str, dict[str, int]] | None:
    if not all(field in r.fields for r in (*split.train, *split.heldout)):
        return None
    return {
        "train": dict(sorted(Counter(str(r.fields[field]) for r in split.train).items())),
        "heldout": dict(sorted(Counter(str(r.fields[field]) for r in split.heldout).items())),
    }


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
                   for r in records).encode()


def _unmeasured(loaded: LoadedRecipe, common: dict, split: Split, n_positions_cap: int | None) -> PreparedData:
    request = _budget_request(loaded, n_positions_cap)
    if request.max_total_tokens is None:
        raise RecipeError.single(
            'tokens.max_total = "auto" needs the tokenizer at compile time, and this one is not available here',
            help="set tokens.max_total to a number of tokens (the runtime checks every example against it), "
            "or use a local tokenizer: [tokenizer] path = \"...\"",
            **loaded.where(("tokens", "max_total")),
        )
    budget, reason = _choose(loaded, common, [], request)

    def records(rows: tuple[Row, ...]) -> list[dict[str, Any]]:
        return [{"fields": r.fields, "line": r.line} for r in rows]

    warning = Diagnostic(
        "warning",
        f"data set \"{common['name']}\": token lengths not measured (no tokenizer at compile time); "
        f"the runtime enforces tokens.max_total = {budget}, and the plan counts every example at that length",
        **loaded.where(("tokens", "max_total")),
    )
    return PreparedData(
        **common,
        measured=False,
        max_total_tokens=budget,
        budget={"max_total_tokens": budget, "reason": reason,
                "measured": False, "train_examples": len(split.train), "eval_examples": len(split.heldout),
                "truncated_examples": 0, "label_truncated_examples": 0, "dropped_examples": 0},
        train_jsonl=_jsonl(records(split.train)),
        heldout_jsonl=_jsonl(records(split.heldout)),
        # Unmeasured: an upper bound, every example at the full budget, every token supervised.
        tokens_per_epoch=len(split.train) * budget,
        supervised_per_epoch=len(split.train) * budget,
        max_completion_tokens=budget,
        warnings=(warning,),
    )


# ---------------------------------------------------------------------------------------------
# prompt / completion templates


def _variants(rows: tuple[Row, ...], fmt: str) -> list[tuple[Row, str | None]]:
    """Preference rows render twice: the completion template sees `chosen`, then the rejected text."""
    if fmt != "preference":
        return [(r, None) for r in rows]
    out = []
    for r in rows:
        out.append((r, "chosen"))
        out.append((Row(r.line, dict(r.fields, chosen=r.fields["rejected"])), "rejected"))
    return out


def _score_field(loaded: LoadedRecipe, name: str) -> str | None:
    """The numeric field a regression reward model learns from this data set, if any."""
    if loaded.recipe.data[name].format == "scored":
        return "score"
    for stage in loaded.recipe.stages:
        if getattr(stage, "objective", None) == "regression" and stage_dataset(loaded.recipe, stage) == name:
            return stage.score_field
    return None


def _reward_fields(loaded: LoadedRecipe, name: str) -> list[str]:
    """The data fields the rewards of a grpo stage on this data set compare completions with."""
    fields = [getattr(reward, "field", None) for stage in loaded.recipe.stages if stage.kind == "grpo"
              and stage_dataset(loaded.recipe, stage) == name for reward in stage.rewards]
    return sorted({f for f in fields if f})


def _round_to(loaded: LoadedRecipe) -> int:
    """Budget granularity: 8 on CPU, 64 on GPUs (tensor-core friendly shapes), unless set."""
    round_to = loaded.recipe.tokens.round_to
    if round_to != "auto":
        return round_to
    return 64 if loaded.recipe.hardware.device == "cuda" else 8


def _budget_request(loaded: LoadedRecipe, n_positions_cap: int | None, eos_ids: tuple[int, ...] = ()) -> BudgetRequest:
    """The recipe's [tokens] section as every data path's budget reads it."""
    tokens = loaded.recipe.tokens
    return BudgetRequest(
        max_total_tokens=None if tokens.max_total == "auto" else tokens.max_total,
        coverage=tokens.coverage,
        round_to=_round_to(loaded),
        n_positions_cap=n_positions_cap,
        truncatable=tuple(tokens.truncatable),
        eos_ids=eos_ids,
        overflow=tokens.overflow,
        overflow_allowed=tokens.overflow_allowed,
    )


def _choose(loaded: LoadedRecipe, common: dict, totals: list[int], request: BudgetRequest,
            unit: str = "templated example") -> tuple[int, str]:
    """`choose_max_total`, its refusal turned into a diagnostic."""
    try:
        return choose_max_total(totals, request, unit=unit)
    except BudgetError as exc:
        raise _budget_error(loaded, common, exc) from None


def _budget_error(loaded: LoadedRecipe, common: dict, exc: BudgetError) -> RecipeError:
    lines = ", ".join(str(n) for n in exc.lines[:20]) + (" ..." if len(exc.lines) > 20 else "")
    return RecipeError.single(
        str(exc) + (f" (rows at lines {lines} of {common['source_label']})" if exc.lines else ""),
        help="raise tokens.max_total, shorten the template, mark more fields truncatable, or accept them "
        'explicitly with tokens.overflow = "drop" (or "truncate") and tokens.overflow_allowed = N',
        **loaded.where(("tokens",)),
    )


def _prepare_prompt_completion(loaded, common, split, encoder, spec, n_positions_cap, label_field) -> PreparedData:
    recipe = loaded.recipe
    name = common["name"]
    where = ("data", name, "template") if recipe.data[name].template else ("template",)
    eos_ids: tuple[int, ...] = ()
    if spec.add_eos:
        eos = encoder.eos_token
        if eos is None:
            raise RecipeError.single("template.add_eos needs an eos_token", **loaded.where(where + ("add_eos",)))
        eos_ids = (encoder.token_id(eos),)
    request = _budget_request(loaded, n_positions_cap, eos_ids)
    ordered = _variants(split.train, common["format"]) + _variants(split.heldout, common["format"])
    try:
        budget, examples = plan_budget(
            [r for r, _ in ordered],
            compile_template(spec.prompt or ""),
            compile_template(spec.completion or ""),
            encoder,
            request,
        )
    except TemplateRowError as exc:
        raise RecipeError([
            Diagnostic("error", f"rendering row failed: {exc}", file=common["source_label"], line=exc.line),
            Diagnostic("error", "while rendering this template", **loaded.where(where)),
        ]) from None
    except BudgetError as exc:
        raise _budget_error(loaded, common, exc) from None
    n_train = len(_variants(split.train, common["format"]))
    kinds = [k for _, k in ordered]
    score_field = _score_field(loaded, name)
    reward_fields = _reward_fields(loaded, name)

    def records(chunk: list[Example | None], kinds: list[str | None]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        pending: dict[str, Any] | None = None
        for example, kind in zip(chunk, kinds):
            if kind == "rejected":
                if pending is not None and example is not None:  # a pair is kept only whole
                    pending["rejected"] = list(example.completion_ids)
                    pending["rejected_prompt"] = list(example.prompt_ids)
                    out.append(pending)
                pending = None
                continue
            record: dict[str, Any] | None = None
            if example is not None:
                record = {"completion": list(example.completion_ids), "line": example.line,
                          "prompt": list(example.prompt_ids)}
                if label_field and label_field in example.fields:
                    record["label"] = str(example.fields[label_field])
                if score_field and score_field in example.fields:
                    record["score"] = float(example.fields[score_field])
                if reward_fields:
                    missing = [f for f in reward_fields if f not in example.fields]
                    if missing:
                        raise RecipeError([Diagnostic(
                            "error", f"row has no field {json.dumps(missing[0])}, which a grpo reward compares with",
                            file=common["source_label"], line=example.line,
                            help="fix the row, or name a field every row has in the reward's `field`")])
                    record["fields"] = {f: str(example.fields[f]) for f in reward_fields}
            if kind == "chosen":
                pending = record
            elif record is not None:
                out.append(record)
        return out

    train_records = records(examples[:n_train], kinds[:n_train])
    heldout_records = records(examples[n_train:], kinds[n_train:])
    stats = {
        "prompt": dataclasses.asdict(budget.prompt),
        "completion": dataclasses.asdict(budget.completion),
        "total": dataclasses.asdict(budget.total),
    }
    info = token_profile(
        budget.max_total_tokens, budget.reason, stats, {k: dataclasses.asdict(v) for k, v in budget.fields.items()},
        budget.histogram, dataclasses.asdict(budget.total_after), len(train_records), len(heldout_records),
        truncated=budget.n_truncated, tokens_removed=budget.tokens_removed, removed_by_field=budget.removed_by_field,
        truncatable=list(budget.truncated_fields), label_truncated=budget.n_label_truncated,
        dropped=budget.n_dropped, fixed_max=budget.fixed_tokens_max,
    )
    kept_train = [e for e, k in zip(examples[:n_train], kinds[:n_train]) if e is not None and k != "rejected"]
    return PreparedData(
        **common,
        measured=True,
        max_total_tokens=budget.max_total_tokens,
        budget=info,
        train_jsonl=_jsonl(train_records),
        heldout_jsonl=_jsonl(heldout_records),
        tokens_per_epoch=sum(len(e.prompt_ids) + len(e.completion_ids) for e in kept_train),
        supervised_per_epoch=sum(len(e.completion_ids) for e in kept_train),
        max_completion_tokens=budget.max_completion_tokens,
    )


# ---------------------------------------------------------------------------------------------
# chat templates


@dataclass(frozen=True)
class _ChatExample:
    line: int
    input_ids: list[int]
    labels: list[int]

    @property
    def supervised(self) -> int:
        return sum(1 for x in self.labels if x != -100)


def _encode_chat(loaded, common, rows: tuple[Row, ...], encoder: Encoder, chat: ChatTemplate,
                 spec: TemplateSpec) -> list[_ChatExample]:
    fmt = common["format"]
    pieces: list[list[tuple[str, bool]]] = []
    problems: list[Diagnostic] = []
    for row in rows:
        try:
            messages = conversation(row.fields, fmt, spec.system)
            pieces.append(segments(chat, messages, spec.loss))
        except ConversationError as exc:
            problems.append(Diagnostic("error", f"row is not a usable conversation: {exc}",
                                       file=common["source_label"], line=row.line))
        except TemplateError as exc:
            raise RecipeError.single(str(exc), **loaded.where(("template",))) from None
    if problems:
        raise RecipeError(problems[:20] + ([Diagnostic("error", f"... and {len(problems) - 20} more rows")]
                                           if len(problems) > 20 else []))
    flat = [text for segs in pieces for text, _ in segs]
    ids = iter(encoder.encode_batch(flat))
    out = []
    for row, segs in zip(rows, pieces):
        input_ids: list[int] = []
        labels: list[int] = []
        for _, supervised in segs:
            chunk = next(ids)
            input_ids += chunk
            labels += chunk if supervised else [-100] * len(chunk)
        out.append(_ChatExample(row.line, input_ids, labels))
    return out


def _prepare_chat(loaded, common, split, encoder, chat, spec, n_positions_cap, label_field) -> PreparedData:
    recipe = loaded.recipe
    tokens = recipe.tokens
    train = _encode_chat(loaded, common, split.train, encoder, chat, spec)
    heldout = _encode_chat(loaded, common, split.heldout, encoder, chat, spec)
    everything = train + heldout
    totals = sorted(len(e.input_ids) for e in everything)
    budget, reason = _choose(loaded, common, totals, _budget_request(loaded, n_positions_cap), "rendered conversation")
    # A conversation over the budget would lose supervised tokens (its end): the overflow policy decides.
    over = [e for e in everything if len(e.input_ids) > budget]
    if over and (tokens.overflow == "fail" or len(over) > tokens.overflow_allowed):
        allowed = "" if tokens.overflow == "fail" else f" (tokens.overflow_allowed = {tokens.overflow_allowed})"
        raise _budget_error(loaded, common, BudgetError(
            f"{len(over)} conversations would lose supervised tokens: they are longer than {budget} tokens{allowed}",
            [e.line for e in over]))

    def fit(chunk: list[_ChatExample]) -> list[_ChatExample]:
        if tokens.overflow == "drop":
            return [e for e in chunk if len(e.input_ids) <= budget]
        return [_ChatExample(e.line, e.input_ids[:budget], e.labels[:budget]) for e in chunk]

    keep_train, keep_heldout = fit(train), fit(heldout)
    kept = keep_train + keep_heldout

    def records(chunk: list[_ChatExample]) -> list[dict[str, Any]]:
        return [{"input_ids": e.input_ids, "labels": e.labels, "line": e.line} for e in chunk]

    stats = {
        "total": dataclasses.asdict(LengthStats.of(totals)),
        "supervised": dataclasses.asdict(LengthStats.of([e.supervised for e in everything])),
    }
    label_truncated = 0 if tokens.overflow == "drop" else len(over)
    info = token_profile(
        budget, reason, stats, _role_lengths(everything), histogram(totals),
        dataclasses.asdict(LengthStats.of([len(e.input_ids) for e in kept])), len(keep_train), len(keep_heldout),
        truncated=label_truncated, tokens_removed=sum(len(e.input_ids) - budget for e in over) if label_truncated else 0,
        removed_by_field={}, truncatable=[], label_truncated=label_truncated,
        dropped=len(everything) - len(kept), fixed_max=None,
    )
    return PreparedData(
        **common,
        measured=True,
        max_total_tokens=budget,
        budget=info,
        train_jsonl=_jsonl(records(keep_train)),
        heldout_jsonl=_jsonl(records(keep_heldout)),
        tokens_per_epoch=sum(len(e.input_ids) for e in keep_train),
        supervised_per_epoch=sum(e.supervised for e in keep_train),
        max_completion_tokens=max((e.supervised for e in keep_train), default=0),
    )


def _role_lengths(examples: list[_ChatExample]) -> dict[str, dict]:
    """Supervised and unsupervised tokens per conversation (the chat analogue of per-field lengths)."""
    return {
        "supervised": dataclasses.asdict(LengthStats.of([e.supervised for e in examples])),
        "unsupervised": dataclasses.asdict(LengthStats.of([len(e.labels) - e.supervised for e in examples])),
    }
