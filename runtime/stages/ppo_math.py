"""The arithmetic of PPO, each piece checked by hand in tests/test_preference.py.

Tensors are [batch, seq - 1]: column t holds what concerns the token at t + 1 (its
log-probability, the value before it is sampled, its reward); `mask` marks completion tokens.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (std with Bessel's correction); zero elsewhere."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (-kl_coef * KL estimate, plus the score on each row's last completion
    token) and the per-token KL estimate log pi - log ref (zero outside the mask)."""
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = _last_index(mask)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last masked entry ([batch]); completions are contiguous."""
    columns = torch.arange(mask.shape[1], device=mask.device)
    return (columns * mask.long()).argmax(dim=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), right to left along each row:
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1}; the value after the
    last completion token is 0. Returns (advantages, returns = advantages + values), zero off-mask."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # outside the completion, carry nothing leftwards into the prompt
        next_value = values[:, t] * m
        next_advantage = advantage * m
    return advantages, (advantages + values) * mask


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate: mean over tokens of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps));
    also the share of tokens where the clip was active."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               value_clip: float) -> torch.Tensor:
    """0.5 * mean over tokens of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
