"""GRPO stage: online RL with rewards computed from the data (Shao et al. 2024; Dr. GRPO, Liu et al. 2025).

One step of this stage is one batch of `rollout_batch_size` prompts per process:
  1. sample `group_size` completions of each prompt with the recipe's generation settings (cut
     after the first end-of-sequence token), as PPO samples (runtime/stages/rollout.py);
  2. score each completion with the stage's declarative rewards (runtime/stages/rewards.py): the
     weighted sum of their values;
  3. group-normalised advantages, one per completion (runtime/stages/grpo_math.py);
  4. `num_iterations` passes over the batch in micro-batches: the clipped policy loss plus
     kl_coef x the k3 KL to the frozen reference, aggregated per token or per completion.

There is no critic and no learned value. With kl_coef = 0 no reference is held; otherwise the
reference is built by the rule DPO and PPO follow (runtime/core/reference.py): the actor with its
LoRA or prefix adapter switched off, or a frozen copy. Before and after the stage, greedy
completions of a fixed sample of held-out prompts are scored: the mean reward, each function's
mean, and the accuracy (share scored 1 by the first exact_match or label_set reward).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from runtime.contract.artifacts import StageReport
from runtime.contract.config import StageSpec
from runtime.core.backend import TorchBackend
from runtime.core.data import IGNORE_INDEX
from runtime.core.loop import stage_report, stage_steps
from runtime.core.losses import ScalarHead, TokenLoss
from runtime.core.model import apply_adapter, count_parameters
from runtime.core.objective import disable_dropout
from runtime.core.reference import frozen_model, frozen_reference
from runtime.core.run import Run
from runtime.stages.grpo_math import group_advantages, grpo_loss
from runtime.stages.ppo import PolicyLogps
from runtime.stages.rewards import Completion, Reward, total_rewards
from runtime.stages.rollout import StepResult, drive, generation_length, sample, step_share, updates_per_pass

HELDOUT_BATCH = 32  # held-out prompts generated together
ACCURACY_KINDS = ("exact_match", "label_set")


def read_prompt_rows(path: Path) -> list[tuple[tuple[int, ...], dict[str, str]]]:
    """Each record's prompt token ids and the data fields the compiler kept for the rewards."""
    with open(path, encoding="utf-8") as f:
        return [(tuple(r["prompt"]), dict(r.get("fields", {}))) for r in map(json.loads, f)]


class GrpoStage:
    """Everything one GRPO stage holds; `train` below drives it."""

    def __init__(self, run: Run, index: int, stage: StageSpec, start: nn.Module):
        self.run, self.index, self.stage = run, index, stage
        config, p = run.config, stage.params
        self.params = p
        data = config.data[stage.data]
        self.rows = read_prompt_rows(run.build_dir / data.train)
        self.heldout_rows = read_prompt_rows(run.build_dir / data.heldout)[: p["heldout_prompts"]]
        self.pad_id, self.eos_id = config.model.pad_token_id, config.model.eos_token_id
        self.max_new_tokens = generation_length(stage, run.build_dir / data.train)
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(run.build_dir / config.tokenizer.file))
        temperature = p["generation"]["temperature"]

        disable_dropout(start)
        self.reference: TokenLoss | None = None
        if p["kl_coef"] > 0:
            frozen = frozen_reference(run, stage, start)
            self.reference = TokenLoss(frozen, temperature=temperature, cross_entropy=stage.cross_entropy) \
                if frozen is not None else None
        scorers = {s["stage"]: ScalarHead(frozen_model(run, s["stage"])) for s in p["rewards"] if s["kind"] == "reward_model"}
        self.rewards = [Reward(s, scorers[s["stage"]].rewards if s["kind"] == "reward_model" else None)
                        for s in p["rewards"]]
        self.actor = apply_adapter(start, stage.adapter)
        self.steps = stage_steps(stage, len(self.rows), run.d.world)
        updates = self.steps * p["num_iterations"] * self.updates_per_batch()
        logps = PolicyLogps(self.actor, temperature=temperature, cross_entropy=stage.cross_entropy)
        self.backend = TorchBackend(config, stage, self.actor, logps, run.d, run.device, updates)

    def updates_per_batch(self) -> int:
        """Optimizer steps of one pass (of `num_iterations`) over a step's completions."""
        return updates_per_pass(self.params["rollout_batch_size"] * self.params["group_size"], self.stage)

    def step_rows(self, step: int) -> list[tuple[tuple[int, ...], dict[str, str]]]:
        """This process's prompts for one step."""
        return step_share(self.rows, self.params["rollout_batch_size"], step, self.run.d, self.run.config.seed)

    # -- completions and their rewards --------------------------------------------------------------

    def complete(self, rows, stage: StageSpec) -> tuple[dict[str, torch.Tensor], list[Completion]]:
        """Sample (or, with a greedy `stage`, decode) one completion per row; the padded batch and the texts."""
        batch = sample(self.actor, [r[0] for r in rows], stage, pad_id=self.pad_id, eos_id=self.eos_id,
                       max_new_tokens=self.max_new_tokens, device=self.run.device)
        completions = []
        for labels, (_, fields) in zip(batch["labels"], rows):
            ids = [t for t in labels.tolist() if t != IGNORE_INDEX]
            completions.append(Completion(self.tokenizer.decode(ids, skip_special_tokens=True), len(ids), fields))
        return {k: v.to(self.run.device) for k, v in batch.items()}, completions

    @torch.no_grad()
    def rollout(self, step: int) -> dict:
        p = self.params
        rows = [row for row in self.step_rows(step) for _ in range(p["group_size"])]  # groups contiguous
        batch, completions = self.complete(rows, self.stage)
        rewards, means = total_rewards(self.rewards, completions, batch)
        advantages, flat = group_advantages(rewards, p["group_size"], p["scale_rewards"])
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
        out = {"batch": batch, "mask": mask, "rewards": rewards, "means": means, "advantages": advantages.to(mask.device),
               "flat": flat, "old_logps": None, "ref_logps": None}
        loss = self.backend.loss_module
        if p["num_iterations"] > 1:  # with one pass the old policy is the current one (its log-probs, detached)
            out["old_logps"] = loss(**batch)[0]
        if p["kl_coef"] > 0:
            out["ref_logps"] = loss.reference(**batch, reference=self.reference)
        return out

    def update(self, r: dict, generator: torch.Generator) -> dict[str, float]:
        """`num_iterations` passes over the step's completions; the mean loss, KL and clip fraction."""
        p, stage = self.params, self.stage
        n = r["mask"].shape[0]
        sums = {"policy_loss": 0.0, "kl": 0.0, "clipfrac": 0.0}
        count = 0
        for _ in range(p["num_iterations"]):
            order = torch.randperm(n, generator=generator).tolist()
            micro = [order[i : i + stage.micro_batch_size] for i in range(0, n, stage.micro_batch_size)]
            for g in range(0, len(micro), stage.grad_accum):
                group = micro[g : g + stage.grad_accum]
                for k, rows in enumerate(group):
                    part = {key: value[rows] for key, value in r["batch"].items()}
                    logps, _ = self.backend.forward(part)
                    old = r["old_logps"][rows] if r["old_logps"] is not None else logps.detach()
                    ref = r["ref_logps"][rows] if r["ref_logps"] is not None else None
                    loss, stats = grpo_loss(logps, old, r["advantages"][rows], r["mask"][rows],
                                            clip_eps=p["clip_eps"], clip_eps_high=p["clip_eps_high"],
                                            kl_coef=p["kl_coef"], ref_logps=ref, aggregation=p["loss_aggregation"])
                    self.backend.backward(loss / len(group), last_micro=k == len(group) - 1)
                    sums["policy_loss"] += float(loss.detach())
                    sums["kl"] += float(stats["kl"])
                    sums["clipfrac"] += float(stats["clipfrac"])
                    count += 1
                self.backend.step()
        return {k: v / max(1, count) for k, v in sums.items()}

    @torch.no_grad()
    def lr(self) -> float:
        return self.backend.lr()

    def step(self, step: int, generator: torch.Generator) -> StepResult:
        """One batch of groups and its `num_iterations` passes of updates."""
        r = self.rollout(step)
        stats = self.update(r, generator)
        return StepResult(int(r["batch"]["attention_mask"].sum()), {
            "reward_mean": float(r["rewards"].mean()), "zero_std_share": float(r["flat"].float().mean()),
            "completion_tokens": float(r["mask"].sum(dim=1).mean()), **stats}, r["means"])

    def heldout(self) -> dict | None:
        """Greedy completions of the fixed held-out sample, scored by the stage's rewards."""
        if not self.heldout_rows:
            return None
        p = self.params
        greedy = self.stage.model_copy(update={"params": {**p, "generation": {**p["generation"], "do_sample": False,
                                                                               "temperature": 1.0, "top_k": 0,
                                                                               "top_p": 1.0}}})
        order = sorted(range(len(self.heldout_rows)), key=lambda i: len(self.heldout_rows[i][0]))
        totals, lengths = [], []
        per: dict[str, list[float]] = {r.name: [] for r in self.rewards}
        accuracy_reward = next((r for r in self.rewards if r.kind in ACCURACY_KINDS), None)
        for begin in range(0, len(order), HELDOUT_BATCH):
            rows = [self.heldout_rows[i] for i in order[begin : begin + HELDOUT_BATCH]]
            batch, completions = self.complete(rows, greedy)
            total, _ = total_rewards(self.rewards, completions, batch)
            totals.extend(total.tolist())
            lengths.extend(c.n_tokens for c in completions)
            for reward in self.rewards:
                per[reward.name].extend(reward.score(completions, batch))
        n = len(totals)
        out = {"prompts": n, "mean_reward": round(sum(totals) / n, 4),
               "rewards": {k: round(sum(v) / n, 4) for k, v in per.items()},
               "mean_completion_tokens": round(sum(lengths) / n, 2)}
        if accuracy_reward is not None:
            out["accuracy"] = round(sum(per[accuracy_reward.name]) / n, 4)
        return out

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        self.backend.save(folder)

    def load(self, folder: Path) -> None:
        self.backend.load(folder)


def train(run: Run, index: int, stage: StageSpec, model: nn.Module) -> tuple[nn.Module, StageReport]:
    """Run one GRPO stage (resumable at step boundaries); returns the policy and the report."""
    grpo = GrpoStage(run, index, stage, model)
    params = count_parameters(grpo.actor)
    driven = drive(run, index, stage, grpo)
    first, final = driven.log.first, driven.log.final
    timeouts = sum(r.timeouts for r in grpo.rewards)
    extra = {"heldout": driven.heldout} if driven.heldout is not None else {}
    report = stage_report(
        stage, driven.log, driven.wall_s, examples=len(grpo.rows), params=params, loss_unit="tokens",
        first_reward=first.reward_mean if first else None, final_reward=final.reward_mean if final else None,
        final_kl=final.kl if final else None, max_new_tokens=grpo.max_new_tokens,
        regex_timeouts=timeouts if any(r.kind == "regex" for r in grpo.rewards) else None, **extra,
    )
    return grpo.actor, report
