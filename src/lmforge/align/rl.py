"""Reinforcement learning from a reward as pure functions of tensors: PPO, RLOO and GRPO.

Layout: a rollout batch is B responses, each a row of R response tokens, left-aligned
(token j of a response sits in column j) and right-padded; `mask` (B, R) is 1 on a
response's tokens, the end-of-text that ended it included, and 0 on padding. Per-token
quantities (log-probs, values, rewards, advantages) share that layout. Nothing here
knows about models, batches or recipes, so each equation is tested on hand-made numbers.

References: PPO (Schulman et al. 2017, arXiv 1707.06347); GAE (Schulman et al. 2016,
arXiv 1506.02438); RLHF with a per-token KL penalty and the adaptive coefficient
(Ziegler et al. 2019, arXiv 1909.08593; Ouyang et al. 2022); the "N implementation
details of RLHF with PPO" (Huang et al. 2024, arXiv 2403.17031) for whitening, value
clipping and the missing-EOS penalty; RLOO (Ahmadian et al. 2024, arXiv 2402.14740);
GRPO (Shao et al. 2024, arXiv 2402.03300).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k3")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """The mean of x over the positions where mask is 1 (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """The unbiased variance of x over the masked positions."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if n > 1 else var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """x scaled to unit variance over the masked positions (and centred with `shift_mean`),
    0 on padding. Advantages are whitened over every response token of the batch, so one
    batch's scale of rewards does not set the step size."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logps: Tensor, ref_logps: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (B, R).

    k1 = log pi - log pi_ref: unbiased, but one sample can be negative. k3 = (r - 1) - log r
    with r = pi_ref / pi (Schulman's "Approximating KL divergence"): unbiased too, never
    negative, lower variance while the policy stays close."""
    log_ratio = logps - ref_logps
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; use one of {KL_ESTIMATORS}")


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """RLHF's per-token reward (B, R): -kl_coef x KL at every response token, plus the
    sequence's score at its last token (Ziegler et al. 2019, Eq. 2)."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1) - 1).clamp(min=0).long()
    return rewards.index_put((torch.arange(len(scores), device=scores.device), last), scores.to(rewards.dtype), accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, Eq. 16) over each response:

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma lam A_{t+1},

    where the state after a response's last token is terminal (V = 0, A = 0). Returns
    (advantages, returns = advantages + values), both 0 on padding."""
    B, R = rewards.shape
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros(B, dtype=values.dtype, device=values.device)
    after = torch.zeros_like(running)  # 1 where the response goes on after token t, 0 where it ended at t
    next_value = torch.zeros_like(running)
    for t in reversed(range(R)):
        delta = rewards[:, t] + gamma * next_value * after - values[:, t]
        running = (delta + gamma * lam * running * after) * mask[:, t]
        advantages[:, t] = running
        after, next_value = mask[:, t], values[:, t]
    return advantages, (advantages + values) * mask


@dataclass
class PolicyLoss:
    loss: Tensor  # the clipped surrogate, to minimize
    clip_fraction: Tensor  # share of tokens whose ratio left [1 - clip, 1 + clip] on the side that clips
    approx_kl: Tensor  # KL(old || new) over the sampled tokens, k3: how far this minibatch moved the policy
    ratio: Tensor  # mean pi_new / pi_old


def policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), a mean over response tokens:

        L = -E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)],   rho = pi(a|s) / pi_old(a|s).

    On the first minibatch of an iteration the policy is the one that sampled, so rho = 1
    exactly and nothing clips."""
    log_ratio = (logps - old_logps) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
        mean_ratio = masked_mean(ratio, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl, mean_ratio)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2) -> tuple[Tensor, Tensor]:
    """The clipped value loss (PPO2 baselines; Huang et al. 2024, detail 9):
    0.5 E[max((V - G)^2, (V_old + clip(V - V_old, -eps, eps) - G)^2)]; returns (loss, clip fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), mask)
    with torch.no_grad():
        fraction = masked_mean((clipped > plain).float(), mask)
    return loss, fraction


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(G - V) / Var(G) over response tokens: 1 is a perfect critic, 0 no better than a constant."""
    var = float(masked_var(returns, mask))
    return float("nan") if var == 0 else 1.0 - float(masked_var(returns - values, mask)) / var


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO (Ahmadian et al. 2024, Eq. 5): each of a prompt's k samples against the mean of
    the other k - 1, for rewards (P, k); an unbiased baseline with no value network."""
    k = rewards.size(1)
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def grpo_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """GRPO (Shao et al. 2024, Sec. 4.1.2): each sample's reward normalized within its
    prompt's group of k, (r - mean) / (std + eps), for rewards (P, k)."""
    if rewards.size(1) < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt")
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + eps)


class AdaptiveKL:
    """The KL coefficient, fixed or adapted towards a target (Ziegler et al. 2019, Sec. 2.2):

        e = clip(KL / target - 1, -0.2, 0.2),   beta <- beta (1 + e n / horizon)

    after each batch of n samples whose mean KL (summed over the response) was KL."""

    def __init__(self, coef: float, target: float = 0.0, horizon: int = 10_000) -> None:
        self.coef, self.target, self.horizon = float(coef), float(target), int(horizon)

    def update(self, kl: float, n: int) -> None:
        if not self.target or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])


class RunningMoments:
    """Mean and standard deviation of every score seen so far (Chan et al.'s parallel
    Welford update), to normalize rewards on a scale that does not jump from batch to batch."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: Tensor) -> None:
        x = x.double().flatten()
        n = x.numel()
        if n == 0:
            return
        mean, var = float(x.mean()), float(x.var(unbiased=False))
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
