"""pretrain and sft: cross-entropy on the supervised tokens, through the shared loop.

Pretraining supervises every token; sft supervises the completion (or the assistant turns of chat
data), and every token too when the template's `loss` is "all". With `train.packing` the rows are
packs of sequences that attend only to themselves (runtime.core.packing).
"""

from __future__ import annotations

from functools import partial

from torch import nn

from runtime.contract.artifacts import StageReport
from runtime.contract.config import StageSpec
from runtime.core.data import collate_rows, read_training_rows
from runtime.core.evaluation import heldout_accuracy
from runtime.core.loop import train_objective
from runtime.core.losses import TokenLoss
from runtime.core.model import apply_adapter, hf_model
from runtime.core.objective import Objective
from runtime.core.packing import collate_packed, pack_budget, pack_rows, packing_report
from runtime.core.run import Run
from runtime.core.segments import use_per_sequence


def objective(run: Run, stage: StageSpec, model: nn.Module) -> Objective:
    """The language-model Objective: the stage's rows (or their packs), the planned adapter on
    `model`, TokenLoss."""
    data = run.config.data[stage.data]
    supervise_prompt = stage.kind == "pretrain" or data.template.loss == "all"
    rows = read_training_rows(run.build_dir / data.train, supervise_prompt=supervise_prompt)
    heldout = read_training_rows(run.build_dir / data.heldout, supervise_prompt=supervise_prompt) \
        if stage.eval_every_steps else ()
    model = apply_adapter(model, stage.adapter)
    pad_id = run.config.model.pad_token_id
    accuracy = heldout_accuracy(run.config, run.build_dir, stage)
    loss = TokenLoss(model, cross_entropy=stage.cross_entropy)
    if not stage.packing:
        return Objective(rows=rows, loss=loss, model=model, heldout_rows=heldout,
                         collate=partial(collate_rows, pad_id=pad_id), accuracy=accuracy)
    budget = pack_budget(data, [len(r) for r in rows])
    report = {**packing_report(rows, budget), "attention": packed_attention(stage, model)}
    run.log(f'[{stage.name}] packing {report["sequences"]} sequences into {report["packs"]} rows of {budget} tokens '
            f'({report["sequences_per_pack"]} a row, {report["padding_share"]:.1%} padding; '
            f'attention {report["attention"]})')
    # held-out rows are packed alike, so they are collated like the training packs (the packed loss
    # equals the unpacked one)
    return Objective(rows=pack_rows(rows, budget), loss=loss, model=model,
                     heldout_rows=pack_rows(heldout, budget) if heldout else (),
                     collate=partial(collate_packed, pad_id=pad_id), accuracy=accuracy, packing=report)


def packed_attention(stage: StageSpec, model: nn.Module) -> str:
    """How the sequences of a pack attend: flash_attention_2's variable-length kernels, one
    attention per sequence (runtime.core.segments; sdpa and eager), or, under train.compile, whose
    blocks would recompile for every new set of sequence boundaries, transformers' block-diagonal
    mask over the whole row."""
    inner = hf_model(model)
    if inner.config._attn_implementation.startswith("flash_attention"):
        return "variable-length (flash)"
    if not stage.compile and use_per_sequence(inner):
        return "per sequence"
    return "block-diagonal mask"


def train(run: Run, index: int, stage: StageSpec, model: nn.Module) -> tuple[nn.Module, StageReport]:
    """One pretrain or sft stage through the shared loop: the trained model and the stage's report."""
    return train_objective(run, index, stage, objective(run, stage, model))
