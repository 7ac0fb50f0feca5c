"""PPO stage: the policy samples completions of the data's prompts, a reward model scores them,
and the policy is updated to earn more reward without drifting far from a frozen reference.

Models (Ouyang et al. 2022; the ColossalChat / ChatLLaMA pipeline):
  actor      the policy being trained, starting from the stage's `from` (usually the SFT model)
  reference  frozen; the KL penalty keeps the actor near it. With a LoRA actor on the same weights
             it is the actor with the adapter switched off, so it costs no memory (the rule DPO
             follows too: runtime/core/reference.py)
  reward     the `reward_model` stage's output, frozen; scores a whole prompt + completion
  critic     estimates the value of every position; starts from `critic_from` (the reward model)

One step of this stage is one rollout batch:
  1. sample completions of `rollout_batch_size` prompts per process (the generation settings of
     the recipe), cut after the first end-of-sequence token;
  2. score them: log-probabilities under actor and reference, values from the critic, and the
     reward model's score of each whole sequence;
  3. per-token rewards r_t = -kl_coef (log pi(a_t) - log ref(a_t)), plus the score on the last
     token; advantages by GAE(gamma, lam), whitened over the batch; returns = advantages + values;
  4. `ppo_epochs` passes over the batch in micro-batches:
       actor  (1 - ptx_coef) * clipped policy loss + ptx_coef * language-model loss on `ptx_data`
              (the convex mix of ColossalChat; ptx_coef = 0 is plain PPO)
       critic 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within value_clip of the old value.

Tensors of a rollout are [batch, seq - 1]: column t holds what concerns the token at t + 1
(its log-probability, the value before it is sampled, its reward); `mask` marks completion tokens.
The arithmetic of steps 3 and 4 is runtime/stages/ppo_math.py; resuming, logging, checkpoints and
the report are the shared pieces of runtime/core/loop.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from runtime.contract.artifacts import StageReport
from runtime.contract.config import StageSpec
from runtime.contract.layout import CHECKPOINT_ACTOR_DIR, CHECKPOINT_CRITIC_DIR, CRITIC_DIR, stage_dir
from runtime.core.backend import TorchBackend
from runtime.core.data import IGNORE_INDEX, collate_rows, read_prompts, read_training_rows
from runtime.core.loop import stage_report, stage_steps
from runtime.core.losses import ScalarHead, TokenLoss
from runtime.core.model import apply_adapter, count_parameters, is_scalar, scalar_model
from runtime.core.objective import disable_dropout
from runtime.core.outputs import write_tree
from runtime.core.reference import as_reference, frozen_model, frozen_reference
from runtime.core.run import Run
from runtime.stages.ppo_math import gae, masked_mean, policy_loss, token_rewards, value_loss, whiten
from runtime.stages.rollout import StepResult, drive, generation_length, sample, step_share, updates_per_pass

HELDOUT_PROMPTS = 64  # held-out prompts whose mean reward is reported before and after the stage
HELDOUT_SEED = 1234  # sampling seed of that measurement, so before and after see the same draws


# ---------------------------------------------------------------------------------------------
# the models


class PolicyLogps(TokenLoss):
    """forward -> log-probabilities of the supervised tokens laid out as [batch, seq - 1], and the mask."""

    def forward(self, input_ids, attention_mask, labels, plain: bool = False):
        temperature = self.temperature
        if plain:  # the PTX language-model loss uses unscaled logits
            self.temperature = 1.0
        try:
            losses, supervised = self.token_losses(input_ids, attention_mask, labels)
        finally:
            self.temperature = temperature
        logps = torch.zeros(supervised.shape, dtype=losses.dtype, device=losses.device)
        logps[supervised] = -losses
        return logps, supervised.float()

    @torch.no_grad()
    def reference(self, input_ids, attention_mask, labels, reference: TokenLoss | None) -> torch.Tensor:
        """The same log-probabilities under the reference: a separate model, or the adapter off."""
        with as_reference(self, reference) as scorer:
            return PolicyLogps.forward(scorer, input_ids, attention_mask, labels)[0]


class CriticValues(ScalarHead):
    """forward -> the value before each next token, [batch, seq - 1]."""

    def forward(self, input_ids, attention_mask):
        return self.values(input_ids, attention_mask)[:, :-1]


@dataclass
class Rollout:
    batch: dict[str, torch.Tensor]  # right-padded prompt + completion, labels on the completion
    mask: torch.Tensor  # [B, L-1] float: completion tokens
    logps: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # [B] reward model scores
    kl: torch.Tensor  # [B] summed KL estimate per completion


# ---------------------------------------------------------------------------------------------
# the stage


class PpoStage:
    """Everything one PPO stage holds; `train` below drives it."""

    def __init__(self, run: Run, index: int, stage: StageSpec, start: nn.Module):
        self.run, self.index, self.stage = run, index, stage
        config, p = run.config, stage.params
        self.params = p
        data = config.data[stage.data]
        self.prompts = read_prompts(run.build_dir / data.train)
        self.heldout_prompts = read_prompts(run.build_dir / data.heldout)[:HELDOUT_PROMPTS]
        self.ptx_rows = read_training_rows(run.build_dir / config.data[p["ptx_data"]].train) if p["ptx_coef"] > 0 else []
        self.pad_id = config.model.pad_token_id
        self.eos_id = config.model.eos_token_id
        self.max_new_tokens = generation_length(stage, run.build_dir / data.train)

        disable_dropout(start)
        frozen = frozen_reference(run, stage, start)
        self.reference = TokenLoss(frozen, temperature=p["generation"]["temperature"],
                                   cross_entropy=stage.cross_entropy) if frozen is not None else None
        self.reward = ScalarHead(frozen_model(run, p["reward_model"]))
        critic = frozen_model(run, p.get("critic_from") or p["reward_model"])
        if not is_scalar(critic):
            critic = scalar_model(critic, config.seed)
        critic.requires_grad_(True)
        disable_dropout(critic)
        critic = apply_adapter(critic.train().to(run.device), stage.adapter, scalar=True)
        self.actor = apply_adapter(start, stage.adapter)
        self.steps = stage_steps(stage, len(self.prompts), run.d.world)
        updates = self.steps * p["ppo_epochs"] * self.updates_per_rollout()
        logps = PolicyLogps(self.actor, temperature=p["generation"]["temperature"], cross_entropy=stage.cross_entropy)
        self.actor_backend = TorchBackend(config, stage, self.actor, logps, run.d, run.device, updates)
        critic_stage = stage.model_copy(update={"learning_rate": p.get("critic_learning_rate") or stage.learning_rate})
        self.critic_backend = TorchBackend(config, critic_stage, critic, CriticValues(critic), run.d, run.device,
                                           updates)
        self.critic = critic

    def updates_per_rollout(self) -> int:
        """Optimizer steps of one pass (of `ppo_epochs`) over a rollout batch."""
        return updates_per_pass(self.params["rollout_batch_size"], self.stage)

    def step_prompts(self, step: int) -> list[tuple[int, ...]]:
        """This process's prompts for one step."""
        return step_share(self.prompts, self.params["rollout_batch_size"], step, self.run.d, self.run.config.seed)

    def ptx_batch(self, update: int) -> dict[str, torch.Tensor]:
        n = self.stage.micro_batch_size
        rng_order = list(range(len(self.ptx_rows)))
        epoch, offset = divmod(update * n, len(self.ptx_rows))
        random.Random(self.run.config.seed + 7919 * (epoch + 1)).shuffle(rng_order)
        picked = [self.ptx_rows[rng_order[(offset + j) % len(rng_order)]] for j in range(n)]
        return collate_rows(picked, self.pad_id)

    # -- one rollout -------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, prompts: list[tuple[int, ...]]) -> Rollout:
        p, device = self.params, self.run.device
        batch = sample(self.actor, prompts, self.stage, pad_id=self.pad_id, eos_id=self.eos_id,
                       max_new_tokens=self.max_new_tokens, device=device)
        batch = {k: v.to(device) for k, v in batch.items()}
        actor = self.actor_backend.loss_module
        logps, mask = actor(**batch)
        ref_logps = actor.reference(**batch, reference=self.reference)
        values = self.critic_backend.loss_module(batch["input_ids"], batch["attention_mask"]) * mask
        scores = self.reward.rewards(batch["input_ids"], batch["attention_mask"])
        rewards, kl = token_rewards(logps, ref_logps, scores, mask, p["kl_coef"])
        advantages, returns = gae(rewards, values, mask, p["gamma"], p["lam"])
        return Rollout(batch, mask, logps, values, whiten(advantages, mask), returns, scores, kl.sum(dim=1))

    def update(self, r: Rollout, update_index: int, generator: torch.Generator) -> dict[str, float]:
        """`ppo_epochs` passes over the rollout; returns the mean losses."""
        p, stage = self.params, self.stage
        n = r.mask.shape[0]
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "ptx_loss": 0.0, "clipfrac": 0.0}
        updates = 0
        for _ in range(p["ppo_epochs"]):
            order = torch.randperm(n, generator=generator).tolist()
            micro = [order[i : i + stage.micro_batch_size] for i in range(0, n, stage.micro_batch_size)]
            for g in range(0, len(micro), stage.grad_accum):
                group = micro[g : g + stage.grad_accum]
                for k, rows in enumerate(group):
                    last = k == len(group) - 1
                    part = {key: value[rows] for key, value in r.batch.items()}
                    mask = r.mask[rows]
                    logps, _ = self.actor_backend.forward(part)
                    pg, clipfrac = policy_loss(logps, r.logps[rows], r.advantages[rows], mask, p["clip_eps"])
                    if p["ptx_coef"] > 0:
                        self.actor_backend.backward((1 - p["ptx_coef"]) * pg / len(group), last_micro=False)
                        ptx = {key: value.to(self.run.device) for key, value in self.ptx_batch(update_index + updates).items()}
                        ptx_logps, ptx_mask = self.actor_backend.forward({**ptx, "plain": True})
                        ptx_loss = -masked_mean(ptx_logps, ptx_mask)
                        self.actor_backend.backward(p["ptx_coef"] * ptx_loss / len(group), last_micro=last)
                        sums["ptx_loss"] += float(ptx_loss.detach())
                    else:
                        self.actor_backend.backward(pg / len(group), last_micro=last)
                    values = self.critic_backend.forward({"input_ids": part["input_ids"],
                                                          "attention_mask": part["attention_mask"]})
                    vl = value_loss(values, r.values[rows], r.returns[rows], mask, p["value_clip"])
                    self.critic_backend.backward(vl / len(group), last_micro=last)
                    sums["policy_loss"] += float(pg.detach())
                    sums["value_loss"] += float(vl.detach())
                    sums["clipfrac"] += float(clipfrac)
                self.actor_backend.step()
                self.critic_backend.step()
                updates += 1
        micro_total = max(1, p["ppo_epochs"] * -(-n // stage.micro_batch_size))
        return {k: v / micro_total for k, v in sums.items()}

    @torch.no_grad()
    def lr(self) -> float:
        return self.actor_backend.lr()

    def step(self, step: int, generator: torch.Generator) -> StepResult:
        """One rollout batch and its `ppo_epochs` passes of updates."""
        r = self.rollout(self.step_prompts(step))
        losses = self.update(r, step * self.params["ppo_epochs"] * self.updates_per_rollout(), generator)
        return StepResult(int(r.batch["attention_mask"].sum()), {
            "reward_mean": float(r.scores.mean()), "kl": float(r.kl.mean()),
            "completion_tokens": float(r.mask.sum(dim=1).mean()), **losses})

    def heldout(self) -> dict | None:
        """Mean reward of sampled completions of the held-out prompts, with a fixed sampling seed."""
        if not self.heldout_prompts:
            return None
        scores, lengths = [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(HELDOUT_SEED)
            for start in range(0, len(self.heldout_prompts), 16):
                prompts = self.heldout_prompts[start : start + 16]
                batch = sample(self.actor, prompts, self.stage, pad_id=self.pad_id, eos_id=self.eos_id,
                               max_new_tokens=self.max_new_tokens, device=self.run.device)
                batch = {k: v.to(self.run.device) for k, v in batch.items()}
                scores.append(self.reward.rewards(batch["input_ids"], batch["attention_mask"]).cpu())
                lengths.extend(((batch["labels"] != IGNORE_INDEX).sum(dim=1)).tolist())
        s = torch.cat(scores)
        return {"prompts": len(s), "mean_reward": round(float(s.mean()), 4),
                "mean_completion_tokens": round(sum(lengths) / len(lengths), 2)}

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        for name, backend in ((CHECKPOINT_ACTOR_DIR, self.actor_backend), (CHECKPOINT_CRITIC_DIR, self.critic_backend)):
            (folder / name).mkdir(exist_ok=True)
            backend.save(folder / name)

    def load(self, folder: Path) -> None:
        self.actor_backend.load(folder / CHECKPOINT_ACTOR_DIR)
        self.critic_backend.load(folder / CHECKPOINT_CRITIC_DIR)


def train(run: Run, index: int, stage: StageSpec, model: nn.Module) -> tuple[nn.Module, StageReport]:
    """Run one PPO stage (resumable at rollout boundaries); returns the actor and the report."""
    ppo = PpoStage(run, index, stage, model)
    params = count_parameters(ppo.actor)
    driven = drive(run, index, stage, ppo)
    first, final = driven.log.first, driven.log.final
    extra = {}
    if driven.heldout is not None:
        extra["heldout"] = driven.heldout
        critic_dir = run.build_dir / stage_dir(stage.name) / CRITIC_DIR  # beside the actor's stages/<name>/model
        critic_dir.parent.mkdir(parents=True, exist_ok=True)
        write_tree(critic_dir, lambda tmp: ppo.critic.save_pretrained(tmp, safe_serialization=True))
    report = stage_report(
        stage, driven.log, driven.wall_s, examples=len(ppo.prompts), params=params, loss_unit="tokens",
        first_reward=first.reward_mean if first else None, final_reward=final.reward_mean if final else None,
        final_kl=final.kl if final else None, max_new_tokens=ppo.max_new_tokens, **extra,
    )
    return ppo.actor, report
