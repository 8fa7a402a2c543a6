"""Proximal Policy Optimisation with a value head on the adapter's hidden states."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..adapters import Adapter
from ..types import Experience, LossOutput, PolicyEval, Rollout, masked_mean
from .base import Algorithm
from .functional import KLEstimator, clipped_policy_loss, clipped_value_loss, gae, token_rewards, whiten


class PPO(Algorithm):
    """PPO (Schulman et al. 2017) with per-token KL-to-base penalty, GAE and a clipped critic."""

    def __init__(
        self,
        samples_per_prompt: int = 1,
        epochs: int = 4,
        minibatch_size: Optional[int] = None,
        clip_range: float = 0.2,
        value_clip_range: float = 0.2,
        value_coef: float = 0.1,
        entropy_coef: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        kl_coef: float = 0.05,
        kl_target: Optional[float] = None,
        kl_horizon: int = 10000,
        kl_loss_coef: float = 0.0,
        kl_estimator: KLEstimator = "full",
    ):
        """
        Args:
            samples_per_prompt: Responses sampled per prompt (each prompt is read once).
            epochs: Passes over each rollout.
            minibatch_size: Samples per update (None: the whole rollout).
            clip_range: ε of the clipped probability ratio.
            value_clip_range: ε of the clipped value update.
            value_coef: Weight of the value loss.
            entropy_coef: Weight of the entropy bonus.
            gamma: Discount.
            lam: GAE λ.
            kl_coef: Initial weight of the per-token KL(tailored ‖ base) penalty.
            kl_target: Target KL per sequence for the adaptive coefficient (None: fixed).
            kl_horizon: Horizon (samples) of the adaptive KL controller.
            kl_loss_coef: Weight of the mean per-token KL(tailored ‖ base) in the loss, exact from the
                full distributions at each position (no sampling noise, unlike the sampled KL in the rewards).
            kl_estimator: How the return's KL penalty is estimated per token (trl's names): 'full', exact
                from the full distributions (≥ 0, no sampling noise; its direct gradient, ``kl_coef`` × the mean
                exact KL, joins the loss: see ``Algorithm.kl_direct_coef``); 'k1', 'k3', 'abs' or 'mse' from the
                sampled token's log-ratio (unfiltered rollouts only). The adaptive controller and ``train/kl``
                always read the exact KL.
        """
        super().__init__(samples_per_prompt, epochs, minibatch_size, kl_coef, kl_target, kl_horizon, kl_loss_coef, kl_estimator)
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

    def values(self, hidden: Tensor, mask: Tensor) -> Tensor:  # [B, T]
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1) * mask

    def prepare(self, rollout: Rollout, scores: Tensor) -> Experience:
        mask = rollout.response_mask
        values = self.values(rollout.hidden, mask).detach()
        rewards = token_rewards(scores, self.kl_penalty(rollout), mask, self.kl_coef)
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        self.update_kl_coef(rollout.kl.sum(-1).mean(), len(scores))
        return Experience(rollout, whiten(advantages, mask), returns, values)

    def loss(self, evaluation: PolicyEval, experience: Experience) -> LossOutput:
        mask = experience.rollout.response_mask
        policy = clipped_policy_loss(evaluation.logprobs, experience.rollout.logprobs, experience.advantages, mask, self.clip_range)
        value = clipped_value_loss(self.values(evaluation.hidden, mask), experience.values, experience.returns, mask, self.value_clip_range)
        entropy = masked_mean(evaluation.entropy, mask)
        loss = policy.loss + self.value_coef * value.loss - self.entropy_coef * entropy
        stats = {"policy": policy.loss, "value": value.loss, "entropy": entropy, "clip_fraction": policy.clip_fraction, "value_clip_fraction": value.clip_fraction}
        return self.loss_output(loss, stats, evaluation, mask)
