"""The arithmetic of the GRPO stage (runtime/stages/grpo.py), on tensors only.

Group-relative policy optimisation (Shao et al. 2024, DeepSeekMath): each prompt is sampled
`group_size` times; a completion's advantage is its reward relative to its group's,

    A_i = r_i - mean(r_group)                      scale_rewards = "none" (Dr. GRPO, Liu et al. 2025)
    A_i = (r_i - mean(r_group)) / (std + 1e-4)     scale_rewards = "group" (std with Bessel's correction)

and every completion token gets its completion's advantage. The token loss is the clipped
surrogate plus a KL penalty to the frozen reference by the k3 estimator (Schulman 2020),

    ratio = exp(log pi - log pi_old)
    loss_t = -min(ratio A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) A) + kl_coef k3_t
    k3_t = exp(log ref - log pi) - (log ref - log pi) - 1

aggregated per token over the whole batch (`loss_aggregation = "token"`) or averaged within each
completion first (`"sequence"`, the original GRPO). Tensors are [batch, seq - 1] as in PPO:
column t concerns the token at t + 1; `mask` marks completion tokens.
"""

from __future__ import annotations

import torch

STD_EPS = 1e-4  # added to the group's std before dividing (as trl does)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of `rewards` ([groups x group_size], each group contiguous) and, per group,
    whether all its rewards are equal (no learning signal)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    advantages = grouped - mean
    if scale_rewards == "group":
        advantages = advantages / (std + STD_EPS)
    elif scale_rewards != "none":
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}")
    flat = (grouped.max(dim=1).values - grouped.min(dim=1).values) == 0
    return advantages.reshape(-1), flat


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(pi || ref) per token: exp(d) - d - 1 with d = log ref - log pi (>= 0)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              clip_eps: float, clip_eps_high: float | None = None, kl_coef: float = 0.0,
              ref_logps: torch.Tensor | None = None, aggregation: str = "token") -> tuple[torch.Tensor, dict]:
    """The loss of a batch and its statistics (mean k3 KL and clip fraction over the completion tokens)."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    a = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + high)
    per_token = -torch.minimum(ratio * a, clipped_ratio * a)
    n = mask.sum().clamp(min=1)
    kl = torch.zeros((), device=logps.device)
    if kl_coef != 0.0:
        if ref_logps is None:
            raise ValueError("kl_coef > 0 needs the reference log-probabilities")
        per_kl = k3_kl(logps, ref_logps)
        per_token = per_token + kl_coef * per_kl
        kl = (per_kl * mask).sum().detach() / n
    if aggregation == "token":
        loss = (per_token * mask).sum() / n
    elif aggregation == "sequence":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    else:
        raise ValueError(f"unknown loss_aggregation {aggregation!r}")
    clipped = ((ratio < 1 - clip_eps) & (a < 0)) | ((ratio > 1 + high) & (a > 0))
    clipfrac = (clipped.float() * mask).sum().detach() / n
    return loss, {"kl": kl, "clipfrac": clipfrac}
