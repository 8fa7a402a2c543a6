"""REINFORCE leave-one-out: critic-free, k samples per prompt."""

from __future__ import annotations

from torch import Tensor

from ..types import Experience, LossOutput, PolicyOutput, Rollout
from .base import Algorithm
from .functional import clipped_policy_loss, leave_one_out_advantages


class RLOO(Algorithm):
    """RLOO: REINFORCE with a leave-one-out baseline over k samples per prompt, critic-free.

    Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"; trl's ``RLOOTrainer``: advantage = return − the mean
    return of the prompt's other k − 1 samples.

    The return of a response is its reward − ``kl_coef``·Σ_t KL_t (the KL penalty in the reward, ``kl_estimator``);
    each token of a response shares its advantage. With ``epochs`` > 1 the probability ratio is clipped as in PPO.
    """

    def __init__(self, *, samples_per_prompt: int = 4, clip_range: float = 0.2, entropy_coef: float = 0.0, **kwargs):
        """
        Args:
            samples_per_prompt: k responses sampled per prompt (k ≥ 2: the baseline is the other k − 1).
            clip_range: ε of the clipped probability ratio (matters when epochs > 1).
            entropy_coef: Weight of the entropy bonus.
            **kwargs: The arguments every algorithm takes (``Algorithm``): epochs, minibatch_size, the KL penalty in the
                reward and the KL term in the loss, loss_agg_mode.

        Raises:
            ValueError: ``samples_per_prompt`` below 2, or an ``Algorithm`` argument out of range.
        """
        if samples_per_prompt < 2:
            raise ValueError(f"RLOO needs samples_per_prompt >= 2 for a leave-one-out baseline, got {samples_per_prompt}")
        super().__init__(samples_per_prompt=samples_per_prompt, **kwargs)
        self.clip_range = clip_range
        self.entropy_coef = entropy_coef

    def make_experience(self, rollout: Rollout, rewards: Tensor) -> Experience:
        """Advantages [B, T]: each response's leave-one-out advantage of its return, at each of its tokens."""
        returns = rewards - self.kl_coef * self.kl_penalty(rollout).sum(-1)
        advantages = leave_one_out_advantages(returns, self.samples_per_prompt)
        return Experience(rollout, advantages[:, None] * rollout.response_mask)

    def loss(self, output: PolicyOutput, minibatch: Experience) -> LossOutput:
        """Clipped policy loss − ``entropy_coef``·entropy (+ the KL term); stats ``policy``, ``entropy``, ``clip_fraction``."""
        mask = minibatch.samples.response_mask
        policy = clipped_policy_loss(output.logprobs, minibatch.samples.logprobs, minibatch.advantages, mask, self.clip_range, self.loss_agg_mode)
        stats = {"policy": policy.loss, "entropy": self.aggregate(output.entropy, mask), "clip_fraction": policy.clip_fraction}
        return self.with_kl_term(policy.loss - self.entropy_coef * stats["entropy"], stats, output, mask)
