"""REINFORCE leave-one-out: critic-free, k samples per prompt."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..types import Experience, LossOutput, PolicyEval, Rollout, masked_mean
from .base import Algorithm
from .functional import KLEstimator, clipped_policy_loss, leave_one_out_advantages


class RLOO(Algorithm):
    """RLOO (Ahmadian et al. 2024): advantage = return − mean return of the prompt's other samples.

    The return is the sequence's score minus ``kl_coef``·KL(tailored ‖ base) of the sequence (estimated per
    token by ``kl_estimator``, summed);
    each token of a sequence shares its advantage. With ``epochs`` > 1 the ratio is clipped as in PPO.
    ``kl_loss_coef`` adds the exact per-token KL to the loss instead (or as well).
    """

    def __init__(
        self,
        samples_per_prompt: int = 4,
        epochs: int = 1,
        minibatch_size: Optional[int] = None,
        clip_range: float = 0.2,
        entropy_coef: float = 0.0,
        kl_coef: float = 0.05,
        kl_target: Optional[float] = None,
        kl_horizon: int = 10000,
        kl_loss_coef: float = 0.0,
        kl_estimator: KLEstimator = "full",
    ):
        """
        Args:
            samples_per_prompt: k responses sampled per prompt (k >= 2).
            epochs: Passes over each rollout.
            minibatch_size: Samples per update (None: the whole rollout).
            clip_range: ε of the clipped probability ratio (matters when epochs > 1).
            entropy_coef: Weight of the entropy bonus.
            kl_coef: Initial weight of the sequence KL(tailored ‖ base) penalty.
            kl_target: Target KL per sequence for the adaptive coefficient (None: fixed).
            kl_horizon: Horizon (samples) of the adaptive KL controller.
            kl_loss_coef: Weight of the mean per-token KL(tailored ‖ base) in the loss, exact from the
                full distributions at each position (no sampling noise, unlike the sampled KL in the return).
            kl_estimator: How the return's KL penalty is estimated per token (trl's names): 'full', exact
                from the full distributions (≥ 0, no sampling noise; its direct gradient, ``kl_coef`` × the mean
                exact KL, joins the loss: see ``Algorithm.kl_direct_coef``); 'k1', 'k3', 'abs' or 'mse' from the
                sampled token's log-ratio (unfiltered rollouts only). The adaptive controller and ``train/kl``
                always read the exact KL.
        """
        if samples_per_prompt < 2:
            raise ValueError(f"RLOO needs samples_per_prompt >= 2 for a leave-one-out baseline, got {samples_per_prompt}")
        super().__init__(samples_per_prompt, epochs, minibatch_size, kl_coef, kl_target, kl_horizon, kl_loss_coef, kl_estimator)
        self.clip_range = clip_range
        self.entropy_coef = entropy_coef

    def prepare(self, rollout: Rollout, scores: Tensor) -> Experience:
        returns = scores - self.kl_coef * self.kl_penalty(rollout).sum(-1)
        advantages = leave_one_out_advantages(returns, self.samples_per_prompt)
        self.update_kl_coef(rollout.kl.sum(-1).mean(), len(scores))
        return Experience(rollout, advantages[:, None] * rollout.response_mask)

    def loss(self, evaluation: PolicyEval, experience: Experience) -> LossOutput:
        mask = experience.rollout.response_mask
        policy = clipped_policy_loss(evaluation.logprobs, experience.rollout.logprobs, experience.advantages, mask, self.clip_range)
        stats = {"policy": policy.loss, "entropy": masked_mean(evaluation.entropy, mask), "clip_fraction": policy.clip_fraction}
        return self.loss_output(policy.loss - self.entropy_coef * stats["entropy"], stats, evaluation, mask)
