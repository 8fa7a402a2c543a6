"""The tensors that flow through one RL step, with their shapes.

B = batch (samples), P = prompt length (left-padded), T = response length (right-padded),
V = vocabulary, H = adapter hidden size.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, TypeVar

import torch
from torch import Tensor


class Prompts(NamedTuple):
    """Tokenised prompts, left-padded so that every row ends at the same position."""

    ids: Tensor  # [B, P]
    mask: Tensor  # [B, P] 1 = real token


class Rollout(NamedTuple):
    """Samples of the tailored policy and everything training needs from the sampling pass.

    ``kl`` is exact at each position: KL(π ‖ p_base) = Σ_v π(v)·(log π(v) − log p_base(v)) of the full
    distributions of the tailored policy π and the base (same temperature and bans), computed while
    sampling: ≥ 0, 0 where the adapter has not moved π from the base, with no sampling noise at a
    position and unaffected by top-k/top-p (filters of what is drawn, not part of π). With unfiltered
    rollouts, ``kl.sum(-1)`` averages to the sequence-level KL(π ‖ base) (chain rule); with filtered
    ones it is the KL at the states the filtered policy visits. Responses replayed from a data pool (Quark)
    carry token ids, masks and control codes only: the sampling-time fields are None
    (``TailoredPolicy.with_base_logprobs`` has the base read its log-probs).
    """

    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]
    response_ids: Tensor  # [B, T] right-padded with the pad id
    response_mask: Tensor  # [B, T] 1 = generated token (the final EOS included)
    logprobs: Optional[Tensor]  # [B, T] log-prob of each token under the tailored policy π (unfiltered: what the loss re-scores)
    ref_logprobs: Optional[Tensor]  # [B, T] log-prob of each token under the base alone (same temperature and bans)
    kl: Optional[Tensor]  # [B, T] exact KL(π ‖ base) in nats of the full distributions at each position, 0 on padding
    base_logprobs: Optional[Tensor]  # [B, T, V] base log-softmax at each response position
    hidden: Optional[Tensor]  # [B, T, H] adapter's last hidden state where each token was chosen
    control: Optional[Tensor] = None  # [B] the adapter's control code (Adapter.add_controls); None without codes


class PolicyEval(NamedTuple):
    """The tailored policy re-evaluated with gradients on a rollout's tokens."""

    logprobs: Tensor  # [B, T]
    entropy: Tensor  # [B, T]
    hidden: Tensor  # [B, T, H]
    kl: Optional[Tensor] = None  # [B, T] exact KL(tailored ‖ base) of the full distributions (when asked for)


class Experience(NamedTuple):
    """A rollout plus what an algorithm derived from it for its loss."""

    rollout: Rollout
    advantages: Optional[Tensor] = None  # [B, T] (policy-gradient algorithms)
    returns: Optional[Tensor] = None  # [B, T] value targets (critic algorithms only)
    values: Optional[Tensor] = None  # [B, T] values at sampling time (critic algorithms only)


class LossOutput(NamedTuple):
    loss: Tensor  # [] what is back-propagated
    stats: dict[str, Tensor]  # detached scalars to log under loss/ and train/


N = TypeVar("N", bound=tuple)


def select(tree: N, index: Tensor) -> N:
    """Index every tensor of a (nested) NamedTuple along the batch dimension."""
    return type(tree)(*(select(x, index) if isinstance(x, tuple) else None if x is None else x[index] for x in tree))


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of ``x`` where ``mask`` is 1; padding never counts."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def position_ids(mask: Tensor) -> Tensor:
    """Explicit positions for a left-padded mask: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence(rollout: Rollout) -> tuple[Tensor, Tensor]:
    """Prompt and response joined: ids [B, P+T] and attention mask [B, P+T]."""
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
    mask = torch.cat([rollout.prompt_mask, rollout.response_mask], dim=1)
    return ids, mask
