"""Reading metrics.jsonl: the records a run logged, per stage, and the held-out losses among them.

The file is appended to as a run trains and again by a resumed run, and a run killed mid-write
leaves a partial last line; these readers take what is whole and keep the later of two records
of one step. The record itself (`MetricsRecord`) is defined with the other artifacts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import ValidationError

from runtime.contract.artifacts import METRICS_FORMAT_VERSION, MetricsRecord, check_version


def read_metrics(path: Path) -> dict[str, list[MetricsRecord]]:
    """Logged records per stage, stages in the order they first appear, records by step.

    A step logged twice (a resumed run logs again from its checkpoint) keeps the later record.
    Lines that are not records with a stage, an integer step and a finite loss are skipped (a run
    killed mid-write leaves a partial last line); a record of another format version is refused.
    """
    path = Path(path)
    by_stage: dict[str, dict[int, MetricsRecord]] = {}
    if not path.is_file():
        return {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        check_version(f"{path}, line {number},", data, METRICS_FORMAT_VERSION)
        try:
            record = MetricsRecord.model_validate(data)
        except ValidationError:
            continue
        if record.loss is not None and math.isfinite(record.loss):
            by_stage.setdefault(record.stage, {})[record.step] = record
    return {stage: [records[s] for s in sorted(records)] for stage, records in by_stage.items()}


def read_eval_losses(path: Path) -> dict[str, list[tuple[int, float]]]:
    """The held-out losses logged during training, per stage: (step, eval_loss), by step. Read like
    `read_metrics` (a step evaluated twice keeps the later value; other lines are skipped)."""
    path = Path(path)
    by_stage: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = MetricsRecord.model_validate_json(line)
        except ValidationError:
            continue
        if record.eval_loss is not None and math.isfinite(record.eval_loss):
            by_stage.setdefault(record.stage, {})[record.step] = record.eval_loss
    return {stage: sorted(points.items()) for stage, points in by_stage.items()}
