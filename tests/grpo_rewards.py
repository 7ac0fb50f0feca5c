"""A python reward for the tests: 1 when the completion's last word is the row's label."""

from __future__ import annotations


def ends_with_label(texts: list[str], fields: list[dict]) -> list[float]:
    return [float(bool(t.split()) and t.split()[-1].lower() == f["label"]) for t, f in zip(texts, fields)]
