"""RL math as pure functions over [B, T] tensors (B samples, T response positions); ``mask`` is 1 on response tokens."""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from ..types import masked_mean


class Advantages(NamedTuple):
    advantages: Tensor  # [B, T]
    returns: Tensor  # [B, T]


class ClippedLoss(NamedTuple):
    loss: Tensor  # []
    clip_fraction: Tensor  # [] share of tokens where the clipped term was taken


KLEstimator = Literal["full", "k1", "k3", "abs", "mse"]
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


def aggregate(values: Tensor, mask: Tensor, mode: LossAggregation = "token-mean") -> Tensor:
    """One loss term [] from per-token values [B, T]: verl's ``agg_loss`` (``verl/trainer/ppo/core_algos.py``).

    'token-mean': Σ values·mask / Σ mask, the mean over every response token of the batch (each token weighs the
    same, so a long response weighs more; trl's and verl's default); 'seq-mean-token-mean': the mean over responses of
    each one's token mean (each response weighs the same, as GRPO's 1/|o_i|); 'seq-mean-token-sum': the mean over
    responses of each one's token sum (Dr. GRPO; the scale grows with the length). Padding never counts; a row without
    tokens contributes 0.

    Args:
        values: [B, T] a loss term per token.
        mask: [B, T] 1 on response tokens.
        mode: 'token-mean', 'seq-mean-token-mean' or 'seq-mean-token-sum'.

    Returns:
        [] the term.

    Raises:
        ValueError: an unknown ``mode``.
    """
    if mode == "token-mean":
        return masked_mean(values, mask)
    if mode == "seq-mean-token-mean":
        return masked_mean(values, mask, dim=-1).mean()
    if mode == "seq-mean-token-sum":
        return (values * mask.to(values.dtype)).sum(-1).mean()
    raise ValueError(f"unknown loss_agg_mode {mode!r}; choose one of {list(get_args(LossAggregation))}")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, exact_kl: Tensor, mask: Tensor, estimator: KLEstimator = "full") -> Tensor:
    """Per-token KL(π ‖ base) penalty [B, T], 0 on padding.

    trl's estimators (``PPOTrainer._kl_penalty``: ``kl`` = k1, ``abs``, ``mse``, ``full``; ``RLOOTrainer``'s
    ``kl_estimator`` k3, after Schulman's note "Approximating KL divergence"), with the sampled token's
    log-ratio r = log π(x) − log p_ref(x): ``full``: Σ_v π(v)·(log π(v) − log p_ref(v)), exact (≥ 0, no
    sampling noise: ``exact_kl``); ``k1``: r (unbiased, can be negative); ``k3``: (e^(−r) − 1) + r (unbiased,
    ≥ 0); ``abs``: |r|; ``mse``: r²/2 (biased, ≥ 0). The sampled ones estimate KL(π ‖ base) only for tokens
    drawn from π itself, i.e. rollouts without top-k/top-p (``IPAModule`` refuses the combination).

    Args:
        logprobs: [B, T] log π of the sampled tokens.
        ref_logprobs: [B, T] log p_ref of the sampled tokens (the base alone).
        exact_kl: [B, T] exact per-position KL(π ‖ base) (``Rollout.kl``).
        mask: [B, T] 1 on response tokens.
        estimator: One of 'full', 'k1', 'k3', 'abs', 'mse'.

    Returns:
        [B, T] the penalty per token, nats.

    Raises:
        ValueError: an unknown ``estimator``.
    """
    log_ratio = logprobs - ref_logprobs
    estimates = {
        "full": lambda: exact_kl, "k1": lambda: log_ratio, "k3": lambda: torch.expm1(-log_ratio) + log_ratio,
        "abs": log_ratio.abs, "mse": lambda: 0.5 * log_ratio.square(),
    }
    if estimator not in estimates:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(estimates)}")
    return estimates[estimator]() * mask


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float | Tensor) -> Tensor:
    """Per-token rewards [B, T] of RLHF's PPO (Ziegler et al. 2019; trl ``PPOTrainer.compute_rewards``): the KL penalty
    −``kl_coef``·KL_t at every token, plus the sequence's reward ``scores`` [B] at its last one; 0 on padding."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(-1).long() - 1  # index of each row's final token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> Advantages:
    """Generalised advantage estimation (Schulman et al. 2016) over per-token ``rewards`` and ``values`` [B, T]: advantages
    and returns (advantages + values, the value targets), each [B, T], 0 on padding; the value after a row's last token is 0."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t] * mask[:, t]
    return Advantages(advantages, (advantages + values) * mask)


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero mean, unit variance over the masked entries [B, T] (padding stays 0), as trl's ``masked_whiten``.

    trl (``trl/core.py``, ``trl/trainer/utils.py`` ``masked_whiten`` with ``masked_var(unbiased=True)``): the mean and
    the Bessel-corrected variance (× n/(n − 1)) of the n masked entries, then (x − mean)·rsqrt(var + ``eps``). With a
    single masked entry (where trl divides by zero) the variance is taken as is, uncorrected.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    var = var * n / (n - 1) if n > 1 else var
    return (x - mean) * torch.rsqrt(var + eps) * mask


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float, mode: LossAggregation = "token-mean"
) -> ClippedLoss:
    """PPO's clipped surrogate (Schulman et al. 2017): max(−A·r, −A·clip(r, 1±ε)) per token, r = π/π_old, aggregated
    by ``mode`` (``aggregate``); the clip fraction is a share of tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return ClippedLoss(aggregate(torch.maximum(unclipped, clipped), mask, mode), masked_mean((clipped > unclipped).float(), mask))


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float, mode: LossAggregation = "token-mean"
) -> ClippedLoss:
    """½·max((V − R)², (clip(V, V_old ± ε) − R)²) per token, aggregated by ``mode``; the clip fraction is a share of tokens."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return ClippedLoss(0.5 * aggregate(torch.maximum(unclipped, clipped), mask, mode), masked_mean((clipped > unclipped).float(), mask))


def leave_one_out_advantages(returns: Tensor, group_size: int) -> Tensor:
    """RLOO's advantages [B] (Kool et al. 2019; Ahmadian et al. 2024; trl ``RLOOTrainer``): each sample's return minus
    the mean return of the other k − 1 samples of its prompt.

    ``returns`` [B] holds k = ``group_size`` consecutive samples per prompt.
    """
    groups = returns.view(-1, group_size)
    baseline = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).view(-1)


def adaptive_kl_coef(coef: Tensor, kl: Tensor, target: float, horizon: int, n_samples: int) -> Tensor:
    """Ziegler et al.'s (2019) proportional controller (trl ``AdaptiveKLController``, Quark's ``adaptive_kl``): the
    coefficient × (1 + clip(kl/target − 1, ±0.2)·n_samples/horizon), so that the KL per sequence ``kl`` nears ``target``."""
    error = (kl / target - 1).clamp(-0.2, 0.2)
    return coef * (1 + error * n_samples / horizon)


def reward_quantiles(rewards: Tensor, n: int) -> Tensor:
    """Quark's quantile of each reward [N] as a LongTensor [N]: 0 for the best, …, n−1 for the worst.

    As GXimingLu/Quark ``data_pool.py`` ``DataPool.add`` assigns them (IPA's ``data_pool.py`` is the same
    code): sort by reward, best first, with ties in the order given (Python's stable ``sorted``; the pool is
    oldest first), put ⌊N/n⌋ samples in each quantile from the best down and the remaining N mod n in the
    worst, n−1. So with N < n every sample is in the worst quantile and quantile 0 is empty.
    """
    rank = torch.empty_like(rewards, dtype=torch.long)  # [N] 0 = the best
    rank[rewards.argsort(descending=True, stable=True)] = torch.arange(len(rewards), device=rewards.device)
    per_quantile = len(rewards) // n
    if per_quantile == 0:
        return torch.full_like(rank, n - 1)
    return (rank // per_quantile).clamp(max=n - 1)
