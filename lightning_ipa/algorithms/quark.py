"""Quark: reward-quantile control codes over a bounded pool of past samples (Lu et al., NeurIPS 2022)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters import Adapter, ControlMode
from ..types import Experience, LossOutput, PolicyEval, Rollout, masked_mean
from .base import Algorithm, detached
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

    def rollout(self, index: Tensor, control: Tensor, device: torch.device) -> Rollout:
        """The samples at ``index`` [N] as a replay rollout conditioned on ``control`` [N]."""
        prompt_ids, prompt_mask, response_ids, response_mask = (self.data[name][index] for name in POOL_FIELDS)
        prompt_start = int(prompt_mask.any(0).long().argmax())  # drop columns that are padding in every row
        response_end = int(response_mask.any(0).sum())
        fields = (prompt_ids[:, prompt_start:], prompt_mask[:, prompt_start:], response_ids[:, :response_end], response_mask[:, :response_end])
        prompt_ids, prompt_mask, response_ids, response_mask = (x.to(device) for x in fields)
        return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, None, None, None, None, None, control.to(device))

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
    """Quark: learn to generate conditioned on the quantile of the reward a sample earned.

    Each rollout (sampled with the best quantile's code, 0) joins a bounded pool; the pool is
    ranked by reward into ``quantiles`` equal parts, each with a control code only the adapter
    reads. The loss, on responses drawn from the pool, is their NLL under the tailored policy
    given their quantile's code, plus ``kl_coef``·KL(tailored ‖ base) (exact, per token) minus
    ``entropy_coef``·entropy. The base reads each replayed response once per rollout (``TailoredPolicy.with_base_logprobs``).
    """

    def __init__(
        self,
        quantiles: int = 5,
        pool_size: int = 4096,
        samples_per_prompt: int = 1,
        epochs: int = 1,
        minibatch_size: Optional[int] = None,
        kl_coef: float = 0.05,
        kl_target: Optional[float] = None,
        kl_horizon: int = 10000,
        entropy_coef: float = 0.06,
        control: ControlMode = "prefix",
    ):
        """
        Args:
            quantiles: Reward quantiles, one control code each (Quark's toxicity setting: 5).
            pool_size: Samples the pool keeps (the oldest are evicted first); saved in checkpoints.
            samples_per_prompt: Responses sampled per prompt (each prompt is read once).
            epochs: Passes over each training batch: as many pool samples as one rollout, drawn at random.
            minibatch_size: Samples per update (None: the whole batch).
            kl_coef: Initial weight of the mean per-token KL(tailored ‖ base), exact from the full
                distributions (Quark: 0.05).
            kl_target: Target KL per sequence of the rollouts for the adaptive coefficient (None: fixed).
            kl_horizon: Horizon (samples) of the adaptive KL controller.
            entropy_coef: Weight of the entropy bonus (Quark: 0.06).
            control: How the adapter reads a quantile's code: 'prefix', one input position before the
                prompt (Quark's control token), or 'every_token', added to every input embedding.
        """
        if quantiles < 1 or pool_size < 1:
            raise ValueError(f"Quark needs quantiles >= 1 and pool_size >= 1, got {quantiles} and {pool_size}")
        super().__init__(samples_per_prompt, epochs, minibatch_size, kl_coef, kl_target, kl_horizon, kl_loss_coef=0.0)
        self.quantiles = quantiles
        self.entropy_coef = entropy_coef
        self.control = control
        self.pool = DataPool(pool_size)

    @property
    def needs_exact_kl(self) -> bool:
        return True

    def experience_size(self, prompts: int) -> tuple[int, str]:
        """``prepare`` replays as many pool samples as a rollout has, at most ``pool_size`` (all the pool holds)."""
        rollout = prompts * self.samples_per_prompt
        how = f"as many as a rollout's {rollout}, {prompts} prompts × samples_per_prompt={self.samples_per_prompt}, replayed from the pool"
        bounded = f", but at most pool_size={self.pool.capacity}" if self.pool.capacity < rollout else ""
        return min(rollout, self.pool.capacity), how + bounded

    def setup(self, adapter: Adapter) -> None:
        adapter.add_controls(self.quantiles, self.control)

    def prepare(self, rollout: Rollout, scores: Tensor) -> Experience:
        self.pool.add(rollout, scores)
        self.update_kl_coef(rollout.kl.sum(-1).mean(), len(scores))
        quantiles = reward_quantiles(self.pool.rewards, self.quantiles)
        drawn = torch.randperm(len(self.pool))[: len(scores)]
        return Experience(self.pool.rollout(drawn, quantiles[drawn], scores.device))

    def loss(self, evaluation: PolicyEval, experience: Experience) -> LossOutput:
        mask = experience.rollout.response_mask
        stats = {"nll": masked_mean(-evaluation.logprobs, mask), "entropy": masked_mean(evaluation.entropy, mask), "kl": masked_mean(evaluation.kl, mask)}
        loss = stats["nll"] + self.kl_coef * stats["kl"] - self.entropy_coef * stats["entropy"]
        return LossOutput(loss, detached(stats))

    def metrics(self) -> dict[str, Tensor]:
        best = self.pool.rewards[reward_quantiles(self.pool.rewards, self.quantiles) == 0]
        metrics = {**super().metrics(), "pool_size": torch.tensor(float(len(self.pool)))}
        if len(best):  # quantile 0 stays empty while the pool holds fewer samples than there are quantiles
            metrics["best_quantile_min_reward"] = best.min()
        return metrics

    def get_extra_state(self) -> dict[str, Any]:
        return self.pool.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state)
