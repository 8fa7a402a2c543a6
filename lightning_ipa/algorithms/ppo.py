"""Proximal Policy Optimisation with a value head on the adapter's hidden states."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..adapters import Adapter
from ..types import Experience, LossOutput, PolicyOutput, Rollout
from .base import Algorithm
from .functional import clipped_policy_loss, clipped_value_loss, gae, token_rewards, whiten


class PPO(Algorithm):
    """PPO: clipped policy and value losses over GAE advantages, with a value head on the adapter's hidden states.

    Schulman et al. 2017, as in RLHF (Ziegler et al. 2019; trl's ``PPOTrainer``): per-token rewards with the KL penalty
    at every token and the reward at the last, GAE, whitened advantages, clipped policy and value losses.
    """

    def __init__(
        self,
        *,
        epochs: int = 4,
        clip_range: float = 0.2,
        value_clip_range: float = 0.2,
        value_coef: float = 0.1,
        entropy_coef: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        **kwargs,
    ):
        """
        Args:
            epochs: Passes over each rollout.
            clip_range: ε of the clipped probability ratio.
            value_clip_range: ε of the clipped value update.
            value_coef: Weight of the value loss.
            entropy_coef: Weight of the entropy bonus.
            gamma: Discount.
            lam: GAE λ.
            **kwargs: The arguments every algorithm takes (``Algorithm``): samples_per_prompt, minibatch_size, the KL
                penalty in the reward and the KL term in the loss, loss_agg_mode.
        """
        super().__init__(epochs=epochs, **kwargs)
        self.clip_range = clip_range
        self.value_clip_range = value_clip_range
        self.value_coef = value_coef
        self.entropy_coef = entropy_coef
        self.gamma = gamma
        self.lam = lam
        self.value_head: Optional[nn.Linear] = None

    def setup(self, adapter: Adapter) -> None:
        self.value_head = nn.Linear(adapter.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def values(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Values [B, T] of the states [B, T, H] where each token was chosen, 0 on padding."""
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1) * mask

    def make_experience(self, rollout: Rollout, rewards: Tensor) -> Experience:
        """Whitened GAE advantages, returns (value targets) and the values at sampling time, each [B, T]."""
        mask = rollout.response_mask
        values = self.values(rollout.hidden, mask).detach()
        token_level = token_rewards(rewards, self.kl_penalty(rollout), mask, self.kl_coef)
        advantages, returns = gae(token_level, values, mask, self.gamma, self.lam)
        return Experience(rollout, whiten(advantages, mask), returns, values)

    def loss(self, output: PolicyOutput, minibatch: Experience) -> LossOutput:
        """Clipped policy loss + ``value_coef``·clipped value loss − ``entropy_coef``·entropy (+ the KL term)."""
        mask, samples = minibatch.samples.response_mask, minibatch.samples
        policy = clipped_policy_loss(output.logprobs, samples.logprobs, minibatch.advantages, mask, self.clip_range, self.loss_agg_mode)
        value = clipped_value_loss(self.values(output.hidden, mask), minibatch.values, minibatch.returns, mask, self.value_clip_range, self.loss_agg_mode)
        entropy = self.aggregate(output.entropy, mask)
        loss = policy.loss + self.value_coef * value.loss - self.entropy_coef * entropy
        stats = {"policy": policy.loss, "value": value.loss, "entropy": entropy, "clip_fraction": policy.clip_fraction, "value_clip_fraction": value.clip_fraction}
        return self.with_kl_term(loss, stats, output, mask)
