"""What the data looks like, how rows become text, and how many tokens they may take."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from compiler.loading.spec.base import Auto, Fraction, NonNegativeInt, PositiveInt, Section, exactly_one

# Record shapes. Each names the fields a template can use (after `fields` renames them):
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "columns": (),  # whatever the file's columns are
    "instruction": ("instruction", "input", "output"),
    "completion": ("user_input", "completion"),
    "scored": ("user_input", "completion", "score"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("user_input",),
    "openai-chat": ("messages",),
    "chatglm-chat": ("conversations",),
    "sharegpt": ("conversations",),
}
CHAT_FORMATS = ("openai-chat", "chatglm-chat", "sharegpt")
DataFormat = Literal[
    "columns", "instruction", "completion", "scored", "preference", "prompt", "openai-chat", "chatglm-chat", "sharegpt"
]


class DataSource(Section):
    """Where the rows come from: exactly one of a pinned asset, local files, or a hub dataset."""

    asset: str | None = None
    """Pinned data asset from specs/assets.toml (sha256-checked)."""
    path: str | None = None
    """Local file or glob (e.g. "data/*.jsonl"), relative to the recipe file."""
    hub: str | None = None
    """Hugging Face hub dataset name (needs network at compile time)."""
    hub_split: str = "train"
    """Split of the hub dataset to read."""
    revision: str | None = None
    """Hub revision to pin."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        exactly_one(self, ("asset", "path", "hub"), "source")
        return self


class DeriveBins(Section):
    """A categorical field cut from a numeric one: value < edges[0] -> labels[0], and so on.
    A value equal to an edge falls into the middle class (the outer bins are strict)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True, defer_build=True)

    name: str
    """Name of the new field."""
    source: str = Field(alias="from")
    """Numeric field the bins are cut from."""
    edges: list[float] = Field(min_length=1)
    """Increasing bin edges."""
    labels: list[str] = Field(min_length=2)
    """One label per bin: len(edges) + 1 of them."""

    @model_validator(mode="after")
    def _shape(self) -> DeriveBins:
        if len(self.labels) != len(self.edges) + 1:
            raise ValueError(
                f"{len(self.edges)} edges cut {len(self.edges) + 1} bins but {len(self.labels)} labels "
                "are given; give one label per bin"
            )
        if list(self.edges) != sorted(self.edges) or len(set(self.edges)) != len(self.edges):
            raise ValueError(f"edges must be strictly increasing, got {self.edges}")
        return self


class SplitSection(Section):
    """How rows are divided into training and held-out sets."""

    heldout_fraction: Fraction = 0.2
    """Share of rows held out for evaluation."""
    seed: int = 0
    """Seed of the shuffle that picks the held-out rows."""


class BadRowsSection(Section):
    """What to do with rows that fail the data checks."""

    policy: Literal["fail", "skip"] = "fail"
    """fail: stop and list every bad row; skip: leave them out and report them in the plan."""
    max_fraction: Fraction = 0.01
    """With policy = "skip": fail anyway when more than this share of rows is bad."""


class TemplateSection(Section):
    """How a row becomes text. Either prompt + completion templates (jinja2, sandboxed), or a chat
    template that renders a conversation."""

    prompt: str | None = None
    """jinja2 source of the prompt; it ends where generation starts. Fields appear as {{ name }}."""
    prompt_file: str | None = None
    """Read the prompt template from this file (relative to the recipe) instead."""
    completion: str | None = None
    """jinja2 source of the supervised target. Never truncated."""
    completion_file: str | None = None
    """Read the completion template from this file (relative to the recipe) instead."""
    chat: Literal["chatml", "llama3", "llama2", "chatglm3", "alpaca", "tokenizer"] | None = None
    """Chat template: a built-in name, or "tokenizer" for the tokenizer's own chat template."""
    system: str | None = None
    """System message for conversations that have none."""
    add_eos: bool = False
    """Append the end-of-sequence token to every completion."""
    loss: Literal["auto", "completion", "assistant", "last_assistant", "all"] = "auto"
    """Which tokens carry loss: the completion, every assistant turn, the last assistant turn, or all
    tokens. "auto": the completion with prompt/completion templates, assistant turns with a chat template."""

    @model_validator(mode="after")
    def _shape(self) -> TemplateSection:
        for part in ("prompt", "completion"):
            if getattr(self, part) is not None and getattr(self, f"{part}_file") is not None:
                raise ValueError(f"give {part} or {part}_file, not both")
        has_text = any(getattr(self, n) is not None for n in ("prompt", "prompt_file", "completion", "completion_file"))
        if self.chat is not None and has_text:
            raise ValueError("give a chat template or prompt/completion templates, not both")
        if self.chat is None and not has_text:
            raise ValueError('give prompt and completion templates, or chat = "chatml" (or another chat template)')
        return self


class Dataset(Section):
    """One named data set. Stages and the eval refer to it by its name."""

    source: DataSource
    """Where the rows come from."""
    format: DataFormat
    """Record shape: columns (free columns), instruction, completion, scored, preference, prompt,
    openai-chat (messages), chatglm-chat (conversations with role/content) or sharegpt (from/value)."""
    file_format: Literal["auto", "tsv", "csv", "json", "jsonl", "parquet"] = "auto"
    """File encoding; "auto" goes by the file extension."""
    columns: list[str] | None = None
    """Column names for a TSV/CSV file without a header row."""
    fields: dict[str, str] = Field(default_factory=dict)
    """Map the format's field names to the file's keys, e.g. { user_input = "question" }; a dotted key
    reaches into nested records, e.g. { output = "instances.0.output" }."""
    html_unescape: list[str] = Field(default_factory=list)
    """Fields whose HTML entities (&amp; and the like) are decoded."""
    derive: list[DeriveBins] = Field(default_factory=list)
    """Categorical fields cut from numeric ones."""
    split: SplitSection = SplitSection()
    """Held-out split."""
    max_rows: PositiveInt | None = None
    """Use only the first this many rows (before splitting)."""
    bad_rows: BadRowsSection = BadRowsSection()
    """Policy for rows that fail the data checks."""
    template: TemplateSection | None = None
    """A template for this data set only; otherwise the recipe's [template] applies."""


class TokensSection(Section):
    """The token budget: the longest example the model sees, sized from measured lengths."""

    max_total: PositiveInt | Auto = "auto"
    """Tokens per example, prompt plus completion. "auto" measures the templated data."""
    coverage: float = Field(default=1.0, gt=0, le=1.0)
    """With max_total = "auto": the share of examples that must fit without truncation (1.0: the longest)."""
    round_to: PositiveInt | Auto = "auto"
    """Round an "auto" budget up to a multiple of this; "auto": 8 on CPU, 64 on GPUs."""
    truncatable: list[str] = Field(default_factory=list)
    """Prompt fields that may be shortened to fit, cut from their end in this order. The completion never is."""
    overflow: Literal["fail", "drop", "truncate"] = "fail"
    """Rows that would lose supervised tokens even with the truncatable fields emptied: fail the compile
    (listing them), drop them, or cut their completion. drop and truncate need overflow_allowed."""
    overflow_allowed: NonNegativeInt = 0
    """How many such rows the recipe accepts; the compile fails when more overflow."""
