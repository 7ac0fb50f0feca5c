"""Every field of the runtime config is read by the runtime or refused by name, and every
[train] key of the recipe reaches the runtime config (or is settled at compile time, for a reason
given here). A field added without either fails these tests: accepted and silently ignored is
the defect they guard against."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from compiler.loading.spec.stages import TrainSection
from runtime.contract import config as contract
from runtime.contract.config import RuntimeConfig, StageSpec
from runtime.core.optim import build_optimizer
from tests.conftest import REPO

# [train] keys that the compiler settles and the runtime needs no copy of.
SETTLED_AT_COMPILE = {
    "global_batch_size": "a check: it must equal micro_batch_size x grad_accum x processes",
    "warmup_ratio": "converted to warmup_steps from the planned step count",
}
# Runtime-config fields the runtime never needs to read, each with the reason.
NOT_READ_BY_THE_RUNTIME = {
    ("RuntimeConfig", "schema_version"): "checked on the raw JSON before the model is built (load_runtime_config)",
    ("ModelSpec", "family"): "a record: the model is built from `config` (its model_type), loaded from `weights`",
    ("DataSpec", "n_train"): "a record of what the compiler wrote: the runtime counts the rows it reads",
    ("DataSpec", "n_heldout"): "a record of what the compiler wrote: the runtime counts the rows it reads",
    ("HardwareSpec", "gpu"): "priced by the plan at compile time; the runtime uses whatever device it is given",
}
# Models the runtime saves whole beside the trained model (every field reaches the output).
SAVED_WHOLE = {"TemplateSpec": "recipe_template.json beside every saved model (runtime/core/outputs.py)"}


def _models() -> list[type[BaseModel]]:
    """RuntimeConfig and every contract model reachable from its fields."""
    seen: list[type[BaseModel]] = []

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.append(model)
        for info in model.model_fields.values():
            for candidate in _types_in(info.annotation):
                walk(candidate)

    walk(RuntimeConfig)
    return seen


def _types_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in getattr(annotation, "__args__", ()) for t in _types_in(arg)]


def _names_read_by_the_runtime() -> set[str]:
    """Attribute names and string subscripts the runtime's code reads: every module under
    runtime/, and from the contract's config module only its functions (the refusal check)."""
    names: set[str] = set()
    trees = [ast.parse(path.read_text()) for path in (REPO / "runtime").rglob("*.py")
             if path != Path(contract.__file__)]
    trees += [ast.parse(inspect.getsource(f)) for f in (contract.unsupported, contract.uses_deepspeed,
                                                         contract.load_runtime_config)]
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                names.add(str(node.slice.value))
    return names


def test_every_runtime_config_field_is_read_or_refused() -> None:
    read = _names_read_by_the_runtime()
    models = _models()
    assert {m.__name__ for m in models} >= {"StageSpec", "ModelSpec", "DataSpec", "TemplateSpec", "HardwareSpec",
                                             "EvalSpec", "AdapterSpec", "TokenizerSpec", "WeightsSpec"}
    ignored = [f"{model.__name__}.{name}" for model in models for name in model.model_fields
               if name not in read and (model.__name__, name) not in NOT_READ_BY_THE_RUNTIME
               and model.__name__ not in SAVED_WHOLE]
    assert ignored == [], f"fields no runtime code reads (use them, or refuse them in unsupported()): {ignored}"


def test_every_train_key_reaches_the_runtime_config() -> None:
    missing = [key for key in TrainSection.model_fields
               if key not in StageSpec.model_fields and key not in SETTLED_AT_COMPILE]
    assert missing == [], f"[train] keys that never reach runtime.json: {missing}"


def test_the_guard_catches_an_unread_field() -> None:
    """The walk above is not vacuous: a field no code reads is reported."""
    read = _names_read_by_the_runtime()
    assert "eval_every_steps" in read and "momentum" in read and "report_to" in read
    assert "a_field_nobody_reads" not in read
    assert "model_dump" in read  # how a model in SAVED_WHOLE is written out


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_sgd_momentum_comes_from_the_recipe(momentum: float) -> None:
    from tests.test_every_key import _stage

    optimizer = build_optimizer(torch.nn.Linear(2, 2), _stage(optimizer="sgd", momentum=momentum))
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(group["momentum"] == momentum for group in optimizer.param_groups)


def _stage(**changes) -> StageSpec:
    base = dict(name="sft", kind="sft", data="d", start="base", adapter={"kind": "full"}, epochs=1, max_steps=None,
                micro_batch_size=1, grad_accum=1, learning_rate=1e-3, lr_schedule="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, optimizer="adamw", adam_betas=(0.9, 0.999), adam_eps=1e-8,
                momentum=0.9, log_every_steps=1, eval_every_steps=None, save_every_steps=None, keep_checkpoints=1,
                length_grouping=False, packing=False, cross_entropy="chunked", compile=False, report_to=())
    return StageSpec.model_validate({**base, **changes})
