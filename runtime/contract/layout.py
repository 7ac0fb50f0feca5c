"""Every file name of a build directory, in one place.

The compiler writes the first group, `recipe run` and `recipe eval` the rest. Code on either side
names a build-directory file only through these constants, so a rename is one edit here.
"""

from __future__ import annotations

# -- written by `recipe compile` -------------------------------------------------------------
RUNTIME_CONFIG_FILE = "runtime.json"
PLAN_JSON = "plan.json"
PLAN_MD = "plan.md"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer/tokenizer.json"
LAUNCH_SH = "launch.sh"
SLURM_JOB = "job.slurm"
DATA_DIR = "data"
TRAIN_SPLIT = "train.jsonl"
HELDOUT_SPLIT = "heldout.jsonl"
COMPILE_SWAP = "compile"  # staging folder kind of a compile: <build>/.swap-compile-<pid>/

# -- written by `recipe run` -----------------------------------------------------------------
RUN_LOCK_FILE = ".run.lock"  # held (flock) by the run training the build
CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"
MERGED_DIR = "model-merged"
STAGES_DIR = "stages"
STAGE_DONE_FILE = "done.json"
BEST_SWAP = "best"  # save_best: stages/<name>/.swap-best-<pid>/ while the best weights are swapped in
BEST_WEIGHTS = "best/trainable.safetensors"  # relative to stages/<name>/
BEST_NOTE = "best/best.json"  # the step and held-out loss of those weights, and the runtime.json they belong to
CRITIC_DIR = "critic"  # a PPO stage's critic, beside its actor: stages/<name>/critic
TEMPLATE_FILE = "recipe_template.json"  # the exact template a saved model was trained with
# inside a checkpoint folder, checkpoints/<stage index>-<stage>-step<step>/
TRAINABLE_FILE = "trainable.pt"  # the trainable parameters (the plain PyTorch backend)
CHECKPOINT_STATE_FILE = "state.json"  # written last: where training stands, the other files' hashes
OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_TAG = "deepspeed"  # the subfolder DeepSpeed writes its shards into
CHECKPOINT_ACTOR_DIR = "actor"  # a PPO checkpoint: the actor's and the critic's state side by side
CHECKPOINT_CRITIC_DIR = "critic"
METRICS_FILE = "metrics.jsonl"
TRAIN_REPORT_FILE = "train_report.json"
RUN_REPORT_JSON = "run_report.json"
RUN_REPORT_MD = "run_report.md"
LOSS_PNG = "loss.png"

# -- written by `recipe eval` ----------------------------------------------------------------
EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
PREDICTIONS_FILE = "predictions.jsonl"
CONFUSION_PNG = "confusion.png"
EVAL_FILES = (EVAL_JSON, EVAL_MD, PREDICTIONS_FILE, CONFUSION_PNG)
EVAL_SWAP = "eval"  # staging folder kind of an eval: <build>/.swap-eval-<pid>/


def ds_config_file(stage_name: str, n_stages: int) -> str:
    """The DeepSpeed config of one stage: `ds_config.json` when the build has one stage."""
    return "ds_config.json" if n_stages == 1 else f"ds_config.{stage_name}.json"


def rng_file(rank: int) -> str:
    """One process's random-number state inside a checkpoint folder."""
    return f"rng-rank{rank}.pt"


def data_file(dataset: str, split: str) -> str:
    """A data set's rendered split, relative to the build directory (`split` is TRAIN_SPLIT or HELDOUT_SPLIT)."""
    return f"{DATA_DIR}/{dataset}/{split}"


def stage_dir(stage_name: str) -> str:
    """Where a finished stage's outputs live, relative to the build directory."""
    return f"{STAGES_DIR}/{stage_name}"
