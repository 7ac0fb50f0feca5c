"""The training loop of every stage that learns from a fixed data set (`train_objective`), and the
pieces it shares with PPO's loop, which samples its own data (runtime/stages/ppo.py):

  stage_steps           how many steps a stage takes: the plan's formula (runtime.contract.steps)
  check_planned_steps   refuse a build whose plan.json counts other steps than this run would
  resume                continue a stage from the run's checkpoint, when it belongs to the stage
  StageLog              metrics.jsonl, the trackers (`report_to`), the progress bar or log line,
                        tokens and time
  checkpoint_if_due     a checkpoint every `save_every_steps`
  stage_report          what the stage did, for done.json and train_report.json
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from runtime.contract.artifacts import MetricsRecord, Plan, StageReport, dumps, read_plan
from runtime.contract.config import IncompatibleBuildError, RuntimeConfig, StageSpec, uses_deepspeed
from runtime.contract.layout import METRICS_FILE, PLAN_JSON
from runtime.contract.steps import rollout_steps_per_epoch, steps_per_epoch, total_steps
from runtime.core.backend import make_backend
from runtime.core.best_weights import load_best_weights, save_best_weights
from runtime.core.checkpoint import Checkpointable, CheckpointError, TrainState, load_rng_state, save_checkpoint
from runtime.core.data import length_grouped_batches
from runtime.core.distributed import Dist, all_ranks_sum, any_rank, autocast, peak_memory_gib
from runtime.core.evaluation import HeldoutLoss
from runtime.core.host_memory import current_rss_gib, peak_rss_gib
from runtime.core.model import compile_blocks, count_parameters
from runtime.core.objective import Objective
from runtime.core.packing import training_items
from runtime.core.probe import ProbeOutOfMemory, run_probe
from runtime.core.run import Run
from runtime.core.trackers import open_trackers, scalars_of

# ---------------------------------------------------------------------------------------------
# how many steps


def stage_steps(stage: StageSpec, n_rows: int, world: int) -> int:
    """Steps of a stage over `n_rows` training rows (prompts, for ppo and grpo) on `world` processes."""
    if stage.kind in ("ppo", "grpo"):  # one step is one rollout batch
        if stage.max_steps is not None:
            return stage.max_steps
        return stage.epochs * rollout_steps_per_epoch(n_rows, stage.params["rollout_batch_size"], world)
    return total_steps(n_rows, stage.micro_batch_size, stage.grad_accum, world, epochs=stage.epochs,
                       max_steps=stage.max_steps)


def check_planned_steps(plan: Plan, config: RuntimeConfig, build_dir: Path, world: int) -> None:
    """Refuse, before anything trains, a build whose plan.json gives a stage another step count
    than this run would take (another number of processes than compiled for, most likely)."""
    for stage in config.stages:
        planned = plan.stage(stage.name)
        if planned is None:
            raise IncompatibleBuildError(f'{build_dir / PLAN_JSON} has no stage "{stage.name}"; recompile the recipe')
        n_rows = training_items(build_dir, config, stage)
        steps = stage_steps(stage, n_rows, world)
        if steps != planned.steps:
            raise IncompatibleBuildError(
                f'stage "{stage.name}": {PLAN_JSON} plans {planned.steps} steps, but {n_rows} rows on {world} '
                f"process(es) make {steps}; launch the build as compiled (launch.sh), or recompile the recipe "
                "for this launch")


def epoch_groups(rows: Sequence, stage: StageSpec, seed: int, epoch: int, d: Dist) -> list[list[list[int]]]:
    """This rank's micro-batches of one epoch, grouped into optimizer steps (grad_accum each).

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches the
    interrupted one would have. There are `runtime.contract.steps.steps_per_epoch` groups."""
    batches = length_grouped_batches([len(r) for r in rows], stage.micro_batch_size, seed + epoch,
                                     group=stage.length_grouping)
    # Every rank must take the same number of steps; the last few batches may be dropped.
    usable = len(batches) - len(batches) % d.world if d.world > 1 else len(batches)
    mine = batches[d.rank : usable : d.world]
    return [mine[i : i + stage.grad_accum] for i in range(0, len(mine), stage.grad_accum)]


# ---------------------------------------------------------------------------------------------
# resuming, logging, checkpoints, the report


@dataclass(frozen=True)
class Start:
    """Where a stage's loop begins: the first step, or the checkpoint it resumes from."""

    step: int = 0
    tokens: int = 0  # non-pad tokens of all ranks before `step`
    elapsed_s: float = 0.0  # training time before `step`, over earlier attempts
    resumed: bool = False
    evaluations: tuple[tuple[int, float], ...] = ()  # the held-out losses before `step`


def resume(run: Run, index: int, stage: StageSpec, steps: int, saved: Checkpointable) -> Start:
    """Load `saved` and this rank's random numbers from the run's checkpoint when it was written
    in this stage; else the start of the stage."""
    if run.resume is None or run.resume[1].stage_index != index:
        return Start()
    folder, state = run.resume
    if state.world_size != run.d.world:
        raise CheckpointError(
            f"{folder} was written by {state.world_size} processes, this run has {run.d.world}; "
            "resume with the same launch"
        )
    saved.load(folder)
    load_rng_state(folder, run.d.rank)
    run.log(f'resuming stage "{stage.name}" at step {state.step}/{steps} from {folder}')
    return Start(step=state.step, tokens=state.tokens, elapsed_s=state.elapsed_s, resumed=True,
                 evaluations=state.evaluations)


class Progress:
    """Rank 0's view of training: a progress bar on a terminal, a line per log step otherwise."""

    EXTRA = ("accuracy", "margin", "reward_mean", "kl")  # shown beside the loss when a stage logs them

    def __init__(self, stage: StageSpec, total: int, start: int, enabled: bool, planned_tokens_per_s: float | None):
        self.stage, self.total, self.enabled = stage, total, enabled
        self.planned = planned_tokens_per_s  # the plan's speed: shown as the ratio actual / planned
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage.name, unit="step", dynamic_ncols=True)

    def update(self, step: int, record: MetricsRecord | None, eta_s: float) -> None:
        if not self.enabled:
            return
        extra = {key: getattr(record, key) for key in self.EXTRA if getattr(record, key) is not None} if record else {}
        ratio = record.tokens_per_s / self.planned if record and record.tokens_per_s and self.planned else None
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if record:
                shown = {key: f"{value:.4f}" for key, value in extra.items()}
                if ratio is not None:
                    shown["vs_plan"] = f"{ratio:.2f}x"
                self.bar.set_postfix(loss=f"{record.loss:.4f}", **shown, tok_s=f"{record.tokens_per_s:.0f}")
        elif record:
            shown = "".join(f" {key} {value:.4f}" for key, value in extra.items())
            speed = f" ({ratio:.2f}x planned)" if ratio is not None else ""
            print(
                f"[{self.stage.name}] step {step}/{self.total} loss {record.loss:.4f}{shown} lr {record.lr:.2e} "
                f"{record.tokens_per_s:.0f} tok/s{speed} eta {eta_s:.0f}s",
                file=sys.stderr, flush=True,
            )

    def note(self, line: str) -> None:
        """A line of its own on rank 0's stderr (above the bar, on a terminal)."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif self.enabled:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def planned_memory(run: Run, stage: StageSpec) -> tuple[dict[str, float] | None, float | None]:
    """The plan's memory breakdown and peak (GiB per device) for `stage`, when it has them."""
    planned = read_plan(run.build_dir / PLAN_JSON).stage(stage.name)
    if planned is None or planned.memory is None:
        return None, None
    return dict(planned.memory.breakdown_gib), planned.memory.peak_gib


def probe_longest_batch(run: Run, stage: StageSpec, objective: Objective, steps: int, per_epoch: int) -> float | None:
    """The peak of one pass over the longest micro-batch of the steps the stage will run (None
    under DeepSpeed, see runtime.core.probe); raises ProbeOutOfMemory when it does not fit."""
    if uses_deepspeed(run.config.hardware):
        return None
    epochs = -(-steps // per_epoch)
    groups = [group for epoch in range(epochs)
              for group in epoch_groups(objective.rows, stage, run.config.seed, epoch, run.d)][:steps]
    try:
        peak, failed = run_probe(run, stage, objective, groups, lambda: planned_memory(run, stage)), None
    except ProbeOutOfMemory as exc:
        peak, failed = None, exc
    # every rank stops together: one that went on alone would wait for the others forever
    if any_rank(failed is not None, run.d, run.device):
        raise failed or ProbeOutOfMemory(f'stage "{stage.name}": another process\'s longest micro-batch ran out '
                                         "of memory before the first step (its error is in its log)")
    return peak


def planned_tokens_per_s(run: Run, stage: StageSpec) -> float | None:
    """The plan's training speed for `stage` (its tokens over its planned time), when it has both."""
    planned = read_plan(run.build_dir / PLAN_JSON).stage(stage.name)
    if planned is None or not planned.train_tokens or planned.compute is None or not planned.compute.wall_s:
        return None
    return planned.train_tokens / planned.compute.wall_s


class StageLog:
    """A stage's record as it trains: a line in metrics.jsonl per logged step (rank 0 writes),
    the progress display, the tokens of all ranks, the training time over all attempts."""

    def __init__(self, run: Run, index: int, stage: StageSpec, steps: int, start: Start):
        self.run, self.stage, self.steps, self.start = run, stage, steps, start
        self.tokens = start.tokens
        self.first: MetricsRecord | None = None
        self.final: MetricsRecord | None = None
        self.file = None
        self.trackers = []
        if run.d.is_main:  # the first stage of a fresh run starts the file
            fresh = index == 0 and not start.resumed
            self.file = open(run.build_dir / METRICS_FILE, "w" if fresh else "a", encoding="utf-8")
            self.trackers = open_trackers(run.build_dir, run.config.name, stage)
        self.progress = Progress(stage, steps, start.step, run.d.is_main, planned_tokens_per_s(run, stage))
        self.started = self.window_start = time.perf_counter()
        self.peak_memory_gib: float | None = None
        self.peak_rss_gib: float | None = None

    def due(self, step: int) -> bool:
        return step % self.stage.log_every_steps == 0 or step == self.steps

    def record(self, step: int, window_tokens: int, **metrics: Any) -> MetricsRecord:
        """Log `step`: `metrics` (means since the last record) with the throughput of the
        `window_tokens` non-pad tokens this rank processed since then. Collective."""
        now = time.perf_counter()
        real = all_ranks_sum(window_tokens, self.run.d, self.run.device)
        self.tokens += real
        device = self.run.device
        memory = {"peak_memory_gib": peak_memory_gib(device)} if device.type == "cuda" \
            else {"peak_rss_gib": round(peak_rss_gib(), 3)}
        memory["rss_gib"] = round(current_rss_gib(), 3)  # now, not the high-water mark: shows growth
        record = MetricsRecord(stage=self.stage.name, step=step, **metrics,
                               tokens_per_s=round(real / (now - self.window_start), 1), **memory)
        self.first = self.first or record
        self.final = record
        self.write(record)
        eta = (now - self.started) / max(1, step - self.start.step) * (self.steps - step)
        self.progress.update(step, record, eta)
        self.window_start = now
        return record

    def write(self, record: MetricsRecord) -> None:
        """A row in metrics.jsonl, and the same scalars to every tracker (rank 0)."""
        if self.file:
            self.file.write(dumps(record, indent=None))
            self.file.flush()
        for tracker in self.trackers:
            tracker.log(record.step, scalars_of(record))

    def record_eval(self, step: int, eval_loss: float, eval_accuracy: float | None) -> None:
        """A held-out evaluation's row: the stage, the step, `eval_loss` and `eval_accuracy`."""
        self.write(MetricsRecord(stage=self.stage.name, step=step, eval_loss=eval_loss, eval_accuracy=eval_accuracy))
        accuracy = f", accuracy {eval_accuracy:.4f}" if eval_accuracy is not None else ""
        self.progress.note(f"[{self.stage.name}] step {step}/{self.steps} held-out loss {eval_loss:.4f}{accuracy}")

    def tick(self, step: int) -> None:
        """A step that is not logged: the progress bar moves on."""
        self.progress.update(step, None, 0.0)

    def elapsed_s(self) -> float:
        return self.start.elapsed_s + time.perf_counter() - self.started

    def close(self) -> float:
        """End the log; the stage's training time over all attempts, its peak memory noted."""
        self.progress.close()
        if self.file:
            self.file.close()
        for tracker in self.trackers:
            tracker.close()
        self.peak_memory_gib = peak_memory_gib(self.run.device)
        self.peak_rss_gib = round(peak_rss_gib(), 3)
        return self.elapsed_s()


def checkpoint_if_due(run: Run, index: int, stage: StageSpec, log: StageLog, saved: Checkpointable, step: int,
                      *, epoch: int, batch: int, evaluations: Sequence[tuple[int, float]] = ()) -> None:
    """A checkpoint after every `save_every_steps` steps but the last (the stage's output follows
    it). `epoch` and `batch`: the data position of the next step; `evaluations`: the held-out
    losses so far. Collective."""
    if not stage.save_every_steps or step % stage.save_every_steps or step >= log.steps:
        return
    state = TrainState(
        config_sha256=run.config_sha256, stage_index=index, stage=stage.name, step=step, total_steps=log.steps,
        epoch=epoch, batch=batch, tokens=log.tokens, elapsed_s=round(log.elapsed_s(), 3), world_size=run.d.world,
        evaluations=tuple(evaluations),
    )
    save_checkpoint(run.checkpoints, state, stage.keep_checkpoints, saved, run.d, run.device)


def stage_report(stage: StageSpec, log: StageLog, wall_s: float, *, examples: int, params: tuple[int, int],
                 loss_unit: str, **extra: Any) -> StageReport:
    """The report of a stage whose log is closed; `extra`: what only this kind of stage reports."""
    return StageReport(
        stage=stage.name, kind=stage.kind, adapter=stage.adapter.kind, start_step=log.start.step,
        steps=extra.get("stopped_at_step") or log.steps,  # the steps taken: fewer than planned after an early stop
        wall_s=round(wall_s, 2), tokens=log.tokens, tokens_per_s=round(log.tokens / wall_s, 1) if wall_s else 0.0,
        peak_memory_gib=log.peak_memory_gib, peak_rss_gib=log.peak_rss_gib,
        first_loss=log.first.loss if log.first else None, final_loss=log.final.loss if log.final else None,
        examples=examples, params_total=params[0], params_trainable=params[1], loss_unit=loss_unit, **extra,
    )


# ---------------------------------------------------------------------------------------------
# the loop of fixed-data stages


@dataclass(frozen=True)
class EarlyStop:
    """Where and why `early_stopping_patience` ended a stage before its planned steps."""

    step: int
    reason: str


def early_stop(run: Run, stage: StageSpec, step: int, evaluation: HeldoutLoss) -> EarlyStop:
    """The stop at `step`, logged with its reason: the best evaluation and the patience spent since."""
    best_step, best_loss = evaluation.best() or (0, float("nan"))
    reason = (f"held-out loss not below {best_loss:.4f} (step {best_step}) for {stage.early_stopping_patience} "
              f"evaluations (early_stopping_patience)")
    run.log(f"[{stage.name}] stopping early at step {step}: {reason}")
    return EarlyStop(step, reason)


@dataclass
class StepTimes:
    """The first step of an attempt apart from the rest: with `train.compile` it includes the
    compilation, which the steady-state speed must not average in."""

    first_s: float | None = None
    later_s: float = 0.0
    later_steps: int = 0
    later_tokens: int = 0  # this rank's non-pad tokens after the first step

    def add(self, wall_s: float, tokens: int) -> None:
        if self.first_s is None:
            self.first_s = wall_s
        else:
            self.later_s += wall_s
            self.later_steps += 1
            self.later_tokens += tokens

    def report(self, stage: StageSpec, run: Run) -> dict[str, float]:
        """`steady_tokens_per_s` (all ranks, the steps after the first) and, with compile, `compile_s`:
        the first step's time beyond a steady step's. Collective."""
        tokens = all_ranks_sum(self.later_tokens, run.d, run.device)
        if not self.later_steps:
            return {}
        out = {"steady_tokens_per_s": round(tokens / self.later_s, 1)}
        if stage.compile and self.first_s is not None:
            out["compile_s"] = round(max(0.0, self.first_s - self.later_s / self.later_steps), 3)
        return out


@dataclass
class Window:
    """Sums over the micro-batches since the last logged step."""

    loss: float = 0.0
    count: int = 0  # supervised tokens, pairs or rows: what the loss is averaged over
    tokens: int = 0  # non-pad tokens
    stats: dict[str, float] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        n = max(1, self.count)
        return {"loss": round(self.loss / n, 5), **{name: round(value / n, 5) for name, value in self.stats.items()}}


def train_objective(run: Run, index: int, stage: StageSpec, objective: Objective) -> tuple[nn.Module, StageReport]:
    """One stage through the shared loop: returns the trained model and the stage's report."""
    config, d = run.config, run.d
    rows, model = objective.rows, objective.model
    params = count_parameters(model)
    per_epoch = steps_per_epoch(len(rows), stage.micro_batch_size, stage.grad_accum, d.world)
    if per_epoch == 0:
        raise RuntimeError(f'stage "{stage.name}": {len(rows)} training rows make no batch for {d.world} processes')
    steps = stage_steps(stage, len(rows), d.world)
    # before the backend wraps the model: the probe's gradients must not reach DDP or the optimizer
    # (and before compiling, so that the first step's time is the compilation's)
    probe_peak = probe_longest_batch(run, stage, objective, steps, per_epoch)
    if stage.compile:
        compile_blocks(model)
    backend = make_backend(run, stage, model, objective.loss, steps)
    start = resume(run, index, stage, steps, backend)
    log = StageLog(run, index, stage, steps, start)
    evaluation = HeldoutLoss(stage, objective.heldout_rows, objective.collate, list(start.evaluations))
    stopped: EarlyStop | None = None
    step, window, times = start.step, Window(), StepTimes()
    groups_of: dict[int, list[list[list[int]]]] = {}  # the current epoch's step groups
    model.train()
    while step < steps:
        epoch, group = divmod(step, per_epoch)
        if epoch not in groups_of:
            groups_of = {epoch: epoch_groups(rows, stage, config.seed, epoch, d)}
            if len(groups_of[epoch]) != per_epoch:
                raise RuntimeError(f"epoch grouping made {len(groups_of[epoch])} steps; "
                                   f"runtime.contract.steps counts {per_epoch}")
        micro_batches = groups_of[epoch][group]
        step_started, step_tokens = time.perf_counter(), window.tokens
        for k, micro in enumerate(micro_batches):
            batch = objective.collate([rows[j] for j in micro])
            batch = {key: value.to(run.device) for key, value in batch.items()}
            with autocast(config, run.device):
                out = backend.forward(batch)
            loss_sum, count = out[0], out[1]
            # Mean over the supervised tokens (or pairs, rows) of this micro-batch, averaged over accumulation.
            loss = loss_sum / count.clamp(min=1) / len(micro_batches)
            backend.backward(loss, last_micro=k == len(micro_batches) - 1)
            window.loss += loss_sum.item()
            window.count += int(count)
            window.tokens += int(batch["attention_mask"].sum())
            for name, value in (out[2] if len(out) > 2 else {}).items():
                window.stats[name] = window.stats.get(name, 0.0) + float(value)
        grad_norm = backend.step()
        times.add(time.perf_counter() - step_started, window.tokens - step_tokens)
        step += 1
        if log.due(step):
            log.record(step, window.tokens, epoch=round(epoch + (group + 1) / per_epoch, 3), **window.means(),
                       lr=backend.lr(), grad_norm=round(grad_norm, 4))
            window = Window()
        else:
            log.tick(step)
        if evaluation.due(step, steps):
            eval_loss = evaluation.measure(step, backend.forward, model, run)
            accuracy = objective.accuracy.measure(model, run) if objective.accuracy else None
            log.record_eval(step, eval_loss, accuracy)
            if stage.save_best and evaluation.improved():
                save_best_weights(run, stage.name, model, step, eval_loss)
            if step < steps and evaluation.patience_spent():
                stopped = early_stop(run, stage, step, evaluation)
                break
        next_epoch, next_group = divmod(step, per_epoch)
        checkpoint_if_due(run, index, stage, log, backend, step, epoch=next_epoch, batch=next_group * stage.grad_accum,
                          evaluations=evaluation.history)
    wall_s = log.close()
    extra = {"probe_peak_gib": probe_peak, **times.report(stage, run)}
    if stopped is not None:
        extra.update(stopped_at_step=stopped.step, stop_reason=stopped.reason)
    if stage.save_best and evaluation.best() is not None:
        kept = evaluation.best()[0]
        load_best_weights(run, stage.name, model, kept)
        extra["kept_step"] = kept
        run.log(f"[{stage.name}] save_best: the output is the weights of step {kept} (held-out loss "
                f"{evaluation.best()[1]:.4f})")
    trained = backend.trained_model()
    if objective.heldout is not None and d.is_main:
        extra["heldout"] = heldout = objective.heldout()
        run.log(f"[{stage.name}] held out: {json.dumps(heldout, sort_keys=True)}")
    if objective.packing is not None:
        extra["packing"] = objective.packing
    best = evaluation.best()
    if best is not None:
        extra.update(evaluations=len(evaluation.history), best_eval_step=best[0], best_eval_loss=best[1])
    examples = objective.packing["sequences"] if objective.packing is not None else len(rows)
    report = stage_report(stage, log, wall_s, examples=examples, params=params, loss_unit=objective.unit, **extra)
    return trained, report
