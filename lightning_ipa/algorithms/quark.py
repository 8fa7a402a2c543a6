"""Quark: reward-quantile control codes over a bounded pool of past samples (Lu et al., NeurIPS 2022)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters import Adapter, ControlMode
from ..types import Experience, LossOutput, PolicyOutput, Responses, Rollout
from .base import Algorithm
from .functional import reward_quantiles

POOL_FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")


class DataPool:
    """The last ``capacity`` samples as token ids with their rewards; the oldest are evicted first.

    Prompts stay left-padded and responses right-padded to the widest kept; ids under a 0 mask are 0.
    It lives on the CPU and holds ids only (no log-probs), so its size is cheap to raise.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.data = {name: torch.zeros(0, 0, dtype=torch.long) for name in POOL_FIELDS}
        self.rewards = torch.zeros(0)

    def __len__(self) -> int:
        return len(self.rewards)

    def add(self, rollout: Rollout, rewards: Tensor) -> None:
        """Append a rollout's samples and their rewards [B], then evict down to ``capacity``."""
        new = {
            "prompt_ids": rollout.prompt_ids * rollout.prompt_mask,
            "prompt_mask": rollout.prompt_mask,
            "response_ids": rollout.response_ids * rollout.response_mask,
            "response_mask": rollout.response_mask,
        }
        for name, old in self.data.items():
            width, left = max(old.shape[1], new[name].shape[1]), name.startswith("prompt")
            joined = torch.cat([_pad(old, width, left), _pad(new[name].long().cpu(), width, left)])
            self.data[name] = joined[-self.capacity :]
        self.rewards = torch.cat([self.rewards, rewards.detach().float().cpu()])[-self.capacity :]

    def replay(self, index: Tensor, control: Tensor, device: torch.device) -> Responses:
        """The samples at ``index`` [N] as ``Responses`` (on ``device``, without the columns that are padding in every
        row) to train on under the control codes ``control`` [N]; the base has not read them (``base_distribution`` None)."""
        prompt_ids, prompt_mask, response_ids, response_mask = (self.data[name][index] for name in POOL_FIELDS)
        prompt_start = int(prompt_mask.any(0).long().argmax())  # drop columns that are padding in every row
        response_end = int(response_mask.any(0).sum())
        fields = (prompt_ids[:, prompt_start:], prompt_mask[:, prompt_start:], response_ids[:, :response_end], response_mask[:, :response_end])
        prompt_ids, prompt_mask, response_ids, response_mask = (x.to(device) for x in fields)
        return Responses(prompt_ids, prompt_mask, response_ids, response_mask, control.to(device))

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.data, "rewards": self.rewards}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.data = {name: state[name][-self.capacity :].cpu() for name in POOL_FIELDS}
        self.rewards = state["rewards"][-self.capacity :].cpu()


def _pad(x: Tensor, width: int, left: bool) -> Tensor:
    """Zero-pad [N, W] to [N, width] on the left or the right."""
    extra = width - x.shape[1]
    return F.pad(x, (extra, 0) if left else (0, extra))


class Quark(Algorithm):
    """Quark: learns to generate conditioned on the reward quantile a sample earned, from a pool of past samples.

    Lu et al., "Quark: Controllable Text Generation with Reinforced Unlearning", NeurIPS 2022 (GXimingLu/Quark).

    Each rollout (sampled with the best quantile's code, 0) joins a bounded pool; the pool is ranked by reward into
    ``quantiles`` equal parts, each with a control code only the adapter reads. The experience is not the rollout but a
    batch of as many samples replayed from the pool (``Responses``: tokens and their quantile's code; the base reads
    them in ``TailoredPolicy.forward``). The loss is their NLL under the tailored policy given their quantile's code,
    plus ``kl_loss_coef``·KL(tailored ‖ base) (exact, per token: the KL term in the loss, Quark's ``kl_coef``) minus
    ``entropy_coef``·entropy. There is no return, so no KL penalty in the reward; ``kl_target`` adapts ``kl_loss_coef``
    (Quark's ``adaptive_kl``).
    """

    adaptive_coef = "kl_loss_coef"

    def __init__(
        self,
        *,
        quantiles: int = 5,
        pool_size: int = 4096,
        kl_loss_coef: float = 0.05,
        entropy_coef: float = 0.06,
        control: ControlMode = "prefix",
        **kwargs,
    ):
        """
        Args:
            quantiles: Reward quantiles, one control code each (Quark's toxicity setting: 5).
            pool_size: Samples the pool keeps (the oldest are evicted first); saved in checkpoints.
            kl_loss_coef: Weight of the exact per-token KL(tailored ‖ base) in the loss (Quark: 0.05).
            entropy_coef: Weight of the entropy bonus (Quark: 0.06).
            control: How the adapter reads a quantile's code: 'prefix', one input position before the
                prompt (Quark's control token), or 'every_token', added to every input embedding.
            **kwargs: The arguments every algorithm takes (``Algorithm``): samples_per_prompt, epochs (passes over each
                replayed batch), minibatch_size, kl_target and kl_horizon, loss_agg_mode.

        Raises:
            ValueError: ``quantiles`` or ``pool_size`` below 1, or an ``Algorithm`` argument out of range.
            TypeError: ``kl_coef`` or ``kl_estimator`` (the KL penalty in the reward, which Quark has not).
        """
        if quantiles < 1 or pool_size < 1:
            raise ValueError(f"Quark needs quantiles >= 1 and pool_size >= 1, got {quantiles} and {pool_size}")
        if penalty := sorted({"kl_coef", "kl_estimator"} & set(kwargs)):
            raise TypeError(f"Quark got {', '.join(penalty)}: it has no return to put a KL penalty in; its KL is the term in the "
                            "loss, kl_loss_coef (adapted towards kl_target if set)")
        super().__init__(kl_coef=0.0, kl_estimator="full", kl_loss_coef=kl_loss_coef, **kwargs)
        self.quantiles = quantiles
        self.entropy_coef = entropy_coef
        self.control = control
        self.pool = DataPool(pool_size)

    def experience_size(self, prompts: int) -> tuple[int, str]:
        """``make_experience`` replays as many pool samples as a rollout has, at most ``pool_size`` (all the pool holds)."""
        rollout = prompts * self.samples_per_prompt
        how = f"as many as a rollout's {rollout}, {prompts} prompts × samples_per_prompt={self.samples_per_prompt}, replayed from the pool"
        bounded = f", but at most pool_size={self.pool.capacity}" if self.pool.capacity < rollout else ""
        return min(rollout, self.pool.capacity), how + bounded

    def setup(self, adapter: Adapter) -> None:
        adapter.add_controls(self.quantiles, self.control)

    def make_experience(self, rollout: Rollout, rewards: Tensor) -> Experience:
        """Add the rollout to the pool, rank the pool into quantiles, and replay as many random pool samples under their
        quantile's code (``Experience.samples``: ``Responses``)."""
        self.pool.add(rollout, rewards)
        quantiles = reward_quantiles(self.pool.rewards, self.quantiles)
        drawn = torch.randperm(len(self.pool))[: len(rewards)]
        return Experience(self.pool.replay(drawn, quantiles[drawn], rewards.device))

    def loss(self, output: PolicyOutput, minibatch: Experience) -> LossOutput:
        """NLL − ``entropy_coef``·entropy (+ the KL term); stats ``nll``, ``entropy``, ``kl``."""
        mask = minibatch.samples.response_mask
        stats = {"nll": self.aggregate(-output.logprobs, mask), "entropy": self.aggregate(output.entropy, mask)}
        return self.with_kl_term(stats["nll"] - self.entropy_coef * stats["entropy"], stats, output, mask)

    def stats(self) -> dict[str, Tensor]:
        """``kl_loss_coef``, the pool's size and the lowest reward of its best quantile (once it has one)."""
        best = self.pool.rewards[reward_quantiles(self.pool.rewards, self.quantiles) == 0]
        stats = {"kl_loss_coef": self.kl_loss_coef, "pool_size": torch.tensor(float(len(self.pool)))}
        if len(best):  # quantile 0 stays empty while the pool holds fewer samples than there are quantiles
            stats["best_quantile_min_reward"] = best.min()
        return stats

    def upgrade_checkpoint(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Up to lightning_ipa c8754c5 Quark's KL loss weight (then adapted by ``kl_target``) was saved as ``kl_coef``: it
        moves to ``kl_loss_coef``, and ``kl_coef`` (Quark has no KL penalty in the reward) becomes 0."""
        if prefix + "kl_coef" in state_dict and prefix + "kl_loss_coef" not in state_dict:
            state_dict[prefix + "kl_loss_coef"] = state_dict[prefix + "kl_coef"]
            state_dict[prefix + "kl_coef"] = torch.zeros_like(state_dict[prefix + "kl_coef"])

    def get_extra_state(self) -> dict[str, Any]:
        return self.pool.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state)
