"""The tensors that flow through one RL step, with their shapes.

B = batch (samples), P = prompt length (left-padded), T = response length (right-padded),
V = vocabulary, H = adapter hidden size.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, TypeVar, Union

import torch
from torch import Tensor


class Prompts(NamedTuple):
    """Tokenised prompts, left-padded so that every row ends at the same position."""

    ids: Tensor  # [B, P]
    mask: Tensor  # [B, P] 1 = real token


class Responses(NamedTuple):
    """Prompts and the responses to them as token ids: what ``TailoredPolicy.generate`` returns (evaluation, predict,
    distillation) and what Quark replays from its pool. Nothing of a sampling pass comes with them; before a loss runs
    on them the base reads them once (``TailoredPolicy.read``), which fills ``base_distribution``."""

    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P] 1 = real token
    response_ids: Tensor  # [B, T] right-padded with the pad id
    response_mask: Tensor  # [B, T] 1 = generated token (the final stop token included)
    control: Optional[Tensor] = None  # [B] the adapter's control code (``Adapter.add_controls``); None without codes
    base_distribution: Optional[Tensor] = None  # [B, T, V] as ``Rollout``'s, once the base has read them; None before
    base_support: Optional[Tensor] = None  # as ``Rollout``'s


class Rollout(NamedTuple):
    """Responses sampled from the tailored policy for training, with everything the update reads from the sampling pass
    (``TailoredPolicy.sample``): the base ran once per token there and never runs again on them.

    ``kl`` is exact at each position: KL(π ‖ p_ref) = Σ_v π(v)·(log π(v) − log p_ref(v)) of the full distributions of
    the tailored policy π and the reference, the base alone (same temperature and bans): ≥ 0, 0 where the adapter has
    not moved π from the base, with no sampling noise at a position and unaffected by top-k/top-p (filters of what is
    drawn, not part of π). With unfiltered rollouts, ``kl.sum(-1)`` averages to the sequence-level KL(π ‖ base) (chain
    rule); with filtered ones it is the KL at the states the filtered policy visits. ``logprobs − ref_logprobs`` is the
    sampled token's log-ratio, from which the sampled KL estimators work (``functional.kl_penalty``).
    """

    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]
    response_ids: Tensor  # [B, T] right-padded with the pad id
    response_mask: Tensor  # [B, T] 1 = generated token (the final stop token included)
    logprobs: Tensor  # [B, T] log π of each token (unfiltered: the "old" log-probs of the clipped ratio)
    ref_logprobs: Tensor  # [B, T] log p_ref of each token under the base alone (same temperature and bans)
    kl: Tensor  # [B, T] exact KL(π ‖ base) in nats of the full distributions at each position, 0 on padding
    base_distribution: Optional[Tensor]  # [B, T, V] the base's own log-softmax over the vocabulary at each response
    # position (temperature 1, no bans): what π and the reference are computed from (``TailoredPolicy.distribution``).
    # As ``rollout_memory`` keeps it: float32, bfloat16, [B, T, k] values at ``base_support``, or None (``read`` later)
    hidden: Tensor  # [B, T, H] the adapter's last hidden state where each token was chosen
    control: Optional[Tensor] = None  # [B] the adapter's control code; None without codes
    base_support: Optional[Tensor] = None  # [B, T, k] token ids of ``base_distribution`` [B, T, k] when it is kept
    # top-k sparse (``rollout_memory='top_k'``); None: ``base_distribution`` is dense [B, T, V]


class PolicyOutput(NamedTuple):
    """The tailored policy run with gradients on given responses (``TailoredPolicy.forward``)."""

    logprobs: Tensor  # [B, T] log π of each response token
    entropy: Tensor  # [B, T] entropy of π at each position, nats
    hidden: Tensor  # [B, T, H] the adapter's hidden state where each token was chosen
    kl: Optional[Tensor] = None  # [B, T] exact KL(π ‖ base) of the full distributions (when asked for)


class Experience(NamedTuple):
    """What an algorithm's loss trains on, one row per sample (``Algorithm.make_experience``); ``Algorithm.minibatches``
    splits it along the rows."""

    samples: Union[Rollout, Responses]  # a Rollout (RLOO, PPO), or Responses replayed from a pool (Quark), read by the base
    advantages: Optional[Tensor] = None  # [B, T] (policy-gradient algorithms)
    returns: Optional[Tensor] = None  # [B, T] value targets (critic algorithms only)
    values: Optional[Tensor] = None  # [B, T] values at sampling time (critic algorithms only)


class LossOutput(NamedTuple):
    """One update's loss and what to log of it."""

    loss: Tensor  # [] what is back-propagated
    stats: dict[str, Tensor]  # detached scalars, logged under loss/<name>


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


def sequence(samples: Union[Rollout, Responses]) -> tuple[Tensor, Tensor]:
    """Prompt and response joined: ids [B, P+T] and attention mask [B, P+T]."""
    ids = torch.cat([samples.prompt_ids, samples.response_ids], dim=1)
    mask = torch.cat([samples.prompt_mask, samples.response_mask], dim=1)
    return ids, mask
