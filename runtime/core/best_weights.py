"""`save_best`: the weights of the evaluation with the lowest held-out loss, kept while a stage
trains and made its output when it ends.

At each evaluation that improves on every earlier one, rank 0 writes the trainable parameters and
a note of the step into `stages/<stage>/best/`, the two swapped in together under a journal
(runtime.contract.files.replace_files), so a run killed mid-write leaves the previous best whole.
When the stage ends every rank loads them back into its model, which is then saved as the stage's
output like any other. The note names the runtime.json and the step, so weights left by another
compile, or by a run that diverged from this one, are refused rather than quietly kept.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load, save

from runtime.contract.files import folder_lock, replace_files, roll_back_interrupted
from runtime.contract.layout import BEST_NOTE, BEST_SWAP, BEST_WEIGHTS, stage_dir
from runtime.core.checkpoint import CheckpointError
from runtime.core.outputs import load_trainable
from runtime.core.run import Run


def save_best_weights(run: Run, stage_name: str, model: torch.nn.Module, step: int, eval_loss: float) -> None:
    """Keep `model`'s trainable parameters as the stage's best so far (rank 0 writes)."""
    if not run.d.is_main:
        return
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}
    note = {"config_sha256": run.config_sha256, "step": step, "eval_loss": eval_loss}
    folder = run.build_dir / stage_dir(stage_name)
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        roll_back_interrupted(folder, BEST_SWAP, clean=True)
        replace_files(folder, BEST_SWAP, {BEST_WEIGHTS: save(tensors),
                                          BEST_NOTE: (json.dumps(note, sort_keys=True) + "\n").encode()})


def load_best_weights(run: Run, stage_name: str, model: torch.nn.Module, step: int) -> None:
    """Put the weights kept at `step` (the best evaluation) back into `model` (every rank)."""
    folder = run.build_dir / stage_dir(stage_name)
    if run.d.is_main:  # a swap cut short by a crash is undone before anyone reads
        with folder_lock(folder):
            roll_back_interrupted(folder, BEST_SWAP, clean=True)
    run.d.barrier()
    try:
        note = json.loads((folder / BEST_NOTE).read_text())
        tensors = load((folder / BEST_WEIGHTS).read_bytes())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"save_best: the weights of step {step} in {folder} are unreadable ({exc}); "
                              "delete the build's checkpoints and stages folders and train again") from None
    if note.get("config_sha256") != run.config_sha256 or note.get("step") != step:
        raise CheckpointError(f"save_best: {folder / BEST_NOTE} holds step {note.get('step')} of another run, not "
                              f"the best evaluation (step {step}); delete it and train the stage again")
    device = next(model.parameters()).device
    load_trainable(model, {name: value.to(device) for name, value in tensors.items()}, folder)
