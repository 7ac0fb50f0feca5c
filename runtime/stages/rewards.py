"""Declarative rewards of the GRPO stage: each `[[stages.rewards]]` table of the recipe becomes one
function from a batch of completions to one number each; the stage's reward is their weighted sum.

  exact_match   1 when the completion equals the row's `field` (after the `strip` / `lower` options)
  label_set     1 when the label read from the completion (its first word, or the label of `labels`
                it starts with: the classification eval's two rules) is the row's `field`
  regex         1 when `pattern` matches somewhere in the completion; the match runs under the
                `regex` package's timeout, so a catastrophically backtracking pattern scores 0
                after `timeout_s` instead of hanging the run (counted as `regex_timeouts`)
  length        -(tokens beyond `max_tokens`), so each extra token costs `weight`
  reward_model  the score an earlier reward stage gives the whole prompt + completion
  python        `function = "module:function"`, called as function(texts, fields) -> list of floats;
                the compiler accepts it only under the recipe's `allow_code = true`
"""

from __future__ import annotations

import importlib
import re as stdlib_re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import regex
import torch

_WORD = stdlib_re.compile(r"[\w'-]+")


@dataclass(frozen=True)
class Completion:
    text: str  # decoded, special tokens skipped
    n_tokens: int  # generated tokens, the end-of-sequence token included
    fields: dict[str, str] = field(default_factory=dict)  # the row's data fields the rewards name


ScoreBatch = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # batch of prompt + completion -> [B] scores


def _normalise(text: str, spec: dict) -> str:
    if spec.get("strip", True):
        text = text.strip()
    if spec.get("lower", False):
        text = text.lower()
    return text


def read_label(text: str, extract: str, labels: Sequence[str]) -> str:
    """The label a completion gives: its first word, lowercased (`first_word`), or the first of
    `labels` that the completion starts with, ignoring case and leading spaces (`label_set`)."""
    if extract == "first_word":
        match = _WORD.search(text)
        return match.group(0).lower() if match else ""
    if extract == "label_set":
        head = text.lstrip().lower()
        return next((label.lower() for label in sorted(labels, key=len, reverse=True) if head.startswith(label.lower())), "")
    raise ValueError(f"unknown extraction rule {extract!r}")


class Reward:
    """One reward function; `score` returns a value per completion."""

    def __init__(self, spec: dict, score_batch: ScoreBatch | None = None):
        self.spec = spec
        self.kind = spec["kind"]
        self.name = spec.get("name") or self.kind
        self.weight = float(spec.get("weight", 1.0))
        self.timeouts = 0
        self._score_batch = score_batch
        if self.kind == "regex":
            self._pattern = regex.compile(spec["pattern"])
        elif self.kind == "python":
            module, _, function = spec["function"].partition(":")
            self._function = getattr(importlib.import_module(module), function)
        elif self.kind == "reward_model":
            if score_batch is None:
                raise ValueError("a reward_model reward needs the reward model's scorer")
        elif self.kind not in ("exact_match", "label_set", "length"):
            raise ValueError(f"unknown reward kind {self.kind!r}")

    def score(self, completions: Sequence[Completion], batch: dict[str, torch.Tensor] | None = None) -> list[float]:
        s = self.spec
        if self.kind == "exact_match":
            return [float(_normalise(c.text, s) == _normalise(c.fields[s["field"]], s)) for c in completions]
        if self.kind == "label_set":
            labels = s.get("labels") or []
            return [float(read_label(c.text, s.get("extract", "first_word"), labels) == c.fields[s["field"]].lower())
                    for c in completions]
        if self.kind == "regex":
            return [self._match(c.text) for c in completions]
        if self.kind == "length":
            return [-float(max(0, c.n_tokens - s["max_tokens"])) for c in completions]
        if self.kind == "reward_model":
            if batch is None:
                raise ValueError("a reward_model reward scores token ids: pass the batch")
            return [float(v) for v in self._score_batch(batch)]
        values = self._function([c.text for c in completions], [dict(c.fields) for c in completions])
        values = [float(v) for v in values]
        if len(values) != len(completions):
            raise ValueError(f"{s['function']} returned {len(values)} rewards for {len(completions)} completions")
        return values

    def _match(self, text: str) -> float:
        try:
            return float(self._pattern.search(text, timeout=float(self.spec.get("timeout_s", 0.1))) is not None)
        except TimeoutError:
            self.timeouts += 1
            return 0.0


def total_rewards(rewards: Sequence[Reward], completions: Sequence[Completion],
                  batch: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum per completion ([B]) and each function's mean (unweighted), by name."""
    total = torch.zeros(len(completions), dtype=torch.float32)
    means: dict[str, float] = {}
    for reward in rewards:
        values = torch.tensor(reward.score(completions, batch), dtype=torch.float32)
        total += reward.weight * values
        means[reward.name] = float(values.mean()) if len(values) else 0.0
    return total, means
