"""What every RL algorithm for the adapter provides."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, Optional, get_args

import torch
from torch import Tensor, nn

from ..adapters import Adapter
from ..types import Experience, LossOutput, PolicyEval, Rollout, masked_mean, select
from .functional import KLEstimator, adaptive_kl_coef, kl_penalty


class Algorithm(nn.Module, ABC):
    """An RL algorithm: turns a scored rollout into experience, and experience into a loss.

    Its parameters (e.g. a value head), buffers (e.g. the KL coefficient) and extra state (e.g.
    a data pool) are trained and checkpointed with the adapter.
    """

    def __init__(
        self,
        samples_per_prompt: int,
        epochs: int,
        minibatch_size: Optional[int],
        kl_coef: float,
        kl_target: Optional[float],
        kl_horizon: int,
        kl_loss_coef: float,
        kl_estimator: KLEstimator = "full",
    ):
        """Raises ValueError for ``samples_per_prompt``, ``epochs`` or ``minibatch_size`` below 1, or an unknown ``kl_estimator``."""
        super().__init__()
        counts = {"samples_per_prompt": samples_per_prompt, "epochs": epochs, "minibatch_size": minibatch_size}
        for name, value in counts.items():
            if value is not None and value < 1:
                null = " (or null)" if name == "minibatch_size" else ""
                raise ValueError(f"{type(self).__name__}: {name} must be ≥ 1{null}, got {value}")
        if kl_estimator not in get_args(KLEstimator):
            raise ValueError(f"unknown kl_estimator {kl_estimator!r}; choose one of {list(get_args(KLEstimator))}")
        self.samples_per_prompt = samples_per_prompt
        self.epochs = epochs
        self.minibatch_size = minibatch_size
        self.kl_target = kl_target
        self.kl_horizon = kl_horizon
        self.kl_loss_coef = kl_loss_coef
        self.kl_estimator = kl_estimator
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef)))

    @property
    def needs_exact_kl(self) -> bool:
        """Whether ``loss`` reads ``PolicyEval.kl`` (the exact per-token KL to the base)."""
        return self.kl_loss_coef > 0 or self.kl_direct_coef > 0

    @property
    def kl_direct_coef(self) -> float:
        """Weight of the exact KL's direct gradient in the loss: ``kl_coef`` with the 'full' estimator, else 0.

        A penalty −β·KL(π_t ‖ base_t) in the return depends on the policy's parameters itself, not only
        through which tokens were drawn: the policy gradient of the returns carries the part that steers
        away from states of high KL, and this term the part that lowers the KL at the states visited,
        β·∇ mean_t KL_t (token mean, as the policy loss). A sampled estimator needs none: the score of the
        sampled token carries that part (E[∇log π(x)] = 0 for its own direct term).
        """
        return float(self.kl_coef) if self.kl_estimator == "full" else 0.0

    def setup(self, adapter: Adapter) -> None:
        """Build what depends on the adapter (a value head over its hidden states, control codes)."""

    @abstractmethod
    def prepare(self, rollout: Rollout, scores: Tensor) -> Experience:
        """Advantages (and value targets) from a rollout and its scores [B]."""

    @abstractmethod
    def loss(self, evaluation: PolicyEval, experience: Experience) -> LossOutput:
        """The loss of a minibatch, given the policy re-evaluated on its tokens."""

    def loss_output(self, loss: Tensor, stats: dict[str, Tensor], evaluation: PolicyEval, mask: Tensor) -> LossOutput:
        """``loss`` plus (``kl_loss_coef`` + ``kl_direct_coef``) × the mean exact KL (when used, logged as ``kl``), with detached stats."""
        if self.needs_exact_kl:
            stats["kl"] = masked_mean(evaluation.kl, mask)
            loss = loss + (self.kl_loss_coef + self.kl_direct_coef) * stats["kl"]
        return LossOutput(loss, detached(stats))

    def kl_penalty(self, rollout: Rollout) -> Tensor:
        """Per-token KL(tailored ‖ base) [B, T] that the return is penalised with (``kl_estimator``)."""
        return kl_penalty(rollout.logprobs, rollout.ref_logprobs, rollout.kl, rollout.response_mask, self.kl_estimator)

    def metrics(self) -> dict[str, Tensor]:
        """The algorithm's state worth watching, logged as ``train/<name>`` after each RL step."""
        return {"kl_coef": self.kl_coef}

    def experience_size(self, prompts: int) -> tuple[int, str]:
        """Samples that ``minibatches`` splits per rollout of ``prompts`` prompts, and how they come about (for messages)."""
        return prompts * self.samples_per_prompt, f"{prompts} prompts × samples_per_prompt={self.samples_per_prompt}"

    def updates_per_rollout(self, prompts: int) -> int:
        """Optimizer steps per rollout of ``prompts`` prompts (the data's batch_size): epochs × minibatches.

        Raises:
            ValueError: ``minibatch_size`` does not divide the samples of a rollout (``experience_size``): the last
                minibatch would be smaller and the steps would not count whole rollouts; the message lists the sizes that do.
        """
        size, how = self.experience_size(prompts)
        minibatch = self.minibatch_size or size
        if size % minibatch:
            divisors = [str(d) for d in range(1, size + 1) if size % d == 0]
            choices = " or ".join([", ".join(divisors[:-1]), divisors[-1]] if len(divisors) > 1 else divisors)
            raise ValueError(
                f"minibatch_size={minibatch} does not divide the {size} samples trained on per rollout ({how}): its minibatches "
                f"would be uneven; set --model.algorithm.init_args.minibatch_size to {choices} (null: one minibatch), "
                f"or change --data.init_args.batch_size or samples_per_prompt"
            )
        return self.epochs * (size // minibatch)

    def minibatches(self, experience: Experience) -> Iterator[Experience]:
        """``epochs`` shuffled passes over the experience, in minibatches."""
        ids = experience.rollout.response_ids
        size = ids.shape[0]
        step = self.minibatch_size or size
        for _ in range(self.epochs):
            order = torch.randperm(size, device=ids.device)
            for start in range(0, size, step):
                yield select(experience, order[start : start + step])

    @torch.no_grad()
    def update_kl_coef(self, kl: Tensor, n_samples: int) -> None:
        """Adapt the KL coefficient towards ``kl_target`` (fixed when it is None), given the rollout's mean exact
        sequence KL ``kl`` (``Rollout.kl.sum(-1).mean()``: what ``train/kl`` logs, whatever the penalty's estimator)."""
        if self.kl_target is not None:
            self.kl_coef.copy_(adaptive_kl_coef(self.kl_coef, kl, self.kl_target, self.kl_horizon, n_samples))


def detached(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Loss terms as scalars to log, cut from the graph."""
    return {k: v.detach() for k, v in stats.items()}
