"""What every RL algorithm for the adapter provides, and the arguments they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Iterator, Optional, get_args

import torch
from torch import Tensor, nn

from ..adapters import Adapter
from ..types import Experience, LossOutput, PolicyOutput, Rollout, select
from .functional import KLEstimator, LossAggregation, adaptive_kl_coef, aggregate, kl_penalty


class Algorithm(nn.Module, ABC):
    """An RL algorithm for the adapter: turns a scored rollout into experience, and experience into a loss.

    ``IPAModule.training_step`` calls, once per rollout: ``make_experience(rollout, rewards)``, ``control_kl(rollout)``,
    then for each of ``minibatches(experience)`` one update of ``loss(policy(minibatch.samples), minibatch)``.

    The KL(tailored ‖ base) has one name per place it enters, in every algorithm:

    - ``kl_coef`` (β): the KL penalty in the reward. The return of a response is its reward − β·Σ_t KL_t (RLOO; PPO
      per token), KL_t estimated by ``kl_estimator``. Ziegler et al. (2019), trl's ``kl_coef``.
    - ``kl_loss_coef``: the KL term in the loss, + ``kl_loss_coef`` × the exact KL of the full distributions aggregated
      like the policy loss (``loss_agg_mode``). verl's ``use_kl_loss``/``kl_loss_coef``; Quark's only KL.

    With ``kl_target`` the adaptive controller moves the coefficient named by ``adaptive_coef`` (``kl_coef``; Quark's
    ``kl_loss_coef``). Parameters (a value head), buffers (the KL coefficients) and extra state (a data pool) are
    trained and checkpointed with the adapter.
    """

    adaptive_coef: ClassVar[str] = "kl_coef"  # the coefficient that ``kl_target`` adapts

    def __init__(
        self,
        *,
        samples_per_prompt: int = 1,
        epochs: int = 1,
        minibatch_size: Optional[int] = None,
        kl_coef: float = 0.05,
        kl_target: Optional[float] = None,
        kl_horizon: int = 10000,
        kl_loss_coef: float = 0.0,
        kl_estimator: KLEstimator = "full",
        loss_agg_mode: LossAggregation = "token-mean",
    ):
        """
        Args:
            samples_per_prompt: Responses sampled per prompt in a rollout (each prompt is read once).
            epochs: Passes over each rollout's experience.
            minibatch_size: Samples per update (None: all of a rollout's experience in one).
            kl_coef: β of the KL penalty in the reward (initial value when adapted): return = reward − β·KL(tailored ‖ base).
            kl_target: Target of the adaptive KL controller, in nats per response (the rollout's mean exact sequence KL,
                ``train/kl``): Ziegler et al.'s proportional controller moves the adapted coefficient towards it after
                each rollout (None: fixed).
            kl_horizon: Horizon of the adaptive controller in samples: how fast it moves (Ziegler et al.: 10000).
            kl_loss_coef: Weight of the KL term in the loss: the exact per-token KL(tailored ‖ base) of the full
                distributions (no sampling noise), aggregated by ``loss_agg_mode``.
            kl_estimator: How the penalty in the reward estimates the KL per token (trl's names): 'full', exact from
                the full distributions (≥ 0, no sampling noise; its direct gradient, ``kl_coef`` × the exact KL, joins
                the loss: ``kl_direct_coef``); 'k1', 'k3', 'abs' or 'mse' from the sampled token's log-ratio
                (unfiltered rollouts only). The controller and ``train/kl`` always read the exact KL.
            loss_agg_mode: How each loss term's per-token values [B, T] of a minibatch become one number (verl's
                ``agg_loss``): 'token-mean' (mean over all its response tokens: a long response weighs more, as in
                trl and verl's default), 'seq-mean-token-mean' (each response's token mean, then the mean over
                responses: every response weighs the same), 'seq-mean-token-sum' (each response's token sum, then the
                mean over responses). See ``functional.aggregate``.

        Raises:
            ValueError: ``samples_per_prompt``, ``epochs`` or ``minibatch_size`` below 1, or an unknown ``kl_estimator``
                or ``loss_agg_mode``.
        """
        super().__init__()
        counts = {"samples_per_prompt": samples_per_prompt, "epochs": epochs, "minibatch_size": minibatch_size}
        for name, value in counts.items():
            if value is not None and value < 1:
                null = " (or null)" if name == "minibatch_size" else ""
                raise ValueError(f"{type(self).__name__}: {name} must be ≥ 1{null}, got {value}")
        for name, value, choices in (("kl_estimator", kl_estimator, KLEstimator), ("loss_agg_mode", loss_agg_mode, LossAggregation)):
            if value not in get_args(choices):
                raise ValueError(f"unknown {name} {value!r}; choose one of {list(get_args(choices))}")
        self.samples_per_prompt = samples_per_prompt
        self.epochs = epochs
        self.minibatch_size = minibatch_size
        self.kl_target = kl_target
        self.kl_horizon = kl_horizon
        self.kl_estimator = kl_estimator
        self.loss_agg_mode = loss_agg_mode
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef)))
        self.register_buffer("kl_loss_coef", torch.tensor(float(kl_loss_coef)))

    def setup(self, adapter: Adapter) -> None:
        """Build what depends on the adapter (a value head over its hidden states, control codes)."""

    def upgrade_checkpoint(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Bring a checkpoint's ``state_dict`` (the module's, this algorithm's keys under ``prefix``) from before
        ``kl_loss_coef`` was checkpointed (lightning_ipa c8754c5 and earlier) up to date, in place: the configured
        ``kl_loss_coef`` (then a fixed setting) is added."""
        if prefix + "kl_coef" in state_dict and prefix + "kl_loss_coef" not in state_dict:
            state_dict[prefix + "kl_loss_coef"] = self.kl_loss_coef.detach().clone()

    # ---- one RL step, in order ----

    @abstractmethod
    def make_experience(self, rollout: Rollout, rewards: Tensor) -> Experience:
        """What the loss trains on: advantages (and returns), or a batch replayed from a pool.

        Args:
            rollout: The rollout of B samples (``TailoredPolicy.sample``).
            rewards: [B] the task's reward of each sample, shaped (``IPAModule.shaped_reward``).

        Returns:
            ``Experience`` of B rows (Quark: as many replayed samples, at most its pool's size).
        """

    @torch.no_grad()
    def control_kl(self, rollout: Rollout) -> None:
        """Move the ``adaptive_coef`` coefficient towards ``kl_target`` (nothing when it is None), given the rollout's mean
        exact sequence KL (``Rollout.kl.sum(-1).mean()``, what ``train/kl`` logs): ``functional.adaptive_kl_coef``."""
        if self.kl_target is not None:
            coef = getattr(self, self.adaptive_coef)
            coef.copy_(adaptive_kl_coef(coef, rollout.kl.sum(-1).mean(), self.kl_target, self.kl_horizon, len(rollout.kl)))

    def minibatches(self, experience: Experience) -> Iterator[Experience]:
        """``epochs`` shuffled passes over the experience (torch's global RNG), in minibatches of ``minibatch_size``
        rows; yields ``Experience`` minibatches, each one update."""
        ids = experience.samples.response_ids
        size = ids.shape[0]
        step = self.minibatch_size or size
        for _ in range(self.epochs):
            order = torch.randperm(size, device=ids.device)
            for start in range(0, size, step):
                yield select(experience, order[start : start + step])

    @abstractmethod
    def loss(self, output: PolicyOutput, minibatch: Experience) -> LossOutput:
        """The loss of one update.

        Args:
            output: The tailored policy run with gradients on the minibatch's samples (``TailoredPolicy.forward``;
                ``output.kl`` [B, T] when ``needs_exact_kl``).
            minibatch: Its rows of the experience.

        Returns:
            ``LossOutput``: the loss [] to back-propagate, and its terms as detached scalars (logged as ``loss/<name>``).
        """

    # ---- pieces the algorithms share ----

    @property
    def needs_exact_kl(self) -> bool:
        """Whether ``loss`` reads ``PolicyOutput.kl`` (the exact per-token KL to the base)."""
        return float(self.kl_loss_coef) > 0 or self.kl_direct_coef > 0

    @property
    def kl_direct_coef(self) -> float:
        """Weight of the exact KL's direct gradient in the loss: ``kl_coef`` with the 'full' estimator, else 0.

        A penalty −β·KL(π_t ‖ base_t) in the return depends on the policy's parameters itself, not only
        through which tokens were drawn: the policy gradient of the returns carries the part that steers
        away from states of high KL, and this term the part that lowers the KL at the states visited,
        β·∇ KL_t aggregated as the policy loss. A sampled estimator needs none: the score of the
        sampled token carries that part (E[∇log π(x)] = 0 for its own direct term).
        """
        return float(self.kl_coef) if self.kl_estimator == "full" else 0.0

    def aggregate(self, values: Tensor, mask: Tensor) -> Tensor:
        """One loss term [] from its per-token values [B, T] and the response mask [B, T] (``loss_agg_mode``,
        ``functional.aggregate``)."""
        return aggregate(values, mask, self.loss_agg_mode)

    def with_kl_term(self, loss: Tensor, stats: dict[str, Tensor], output: PolicyOutput, mask: Tensor) -> LossOutput:
        """``loss`` [] + (``kl_loss_coef`` + ``kl_direct_coef``) × the exact KL ``output.kl`` [B, T] aggregated over
        ``mask`` [B, T] (when used; added to ``stats`` as ``kl``); returns it with the stats detached for logging."""
        if self.needs_exact_kl:
            stats["kl"] = self.aggregate(output.kl, mask)
            loss = loss + (float(self.kl_loss_coef) + self.kl_direct_coef) * stats["kl"]
        return LossOutput(loss, {k: v.detach() for k, v in stats.items()})

    def kl_penalty(self, rollout: Rollout) -> Tensor:
        """Per-token KL(tailored ‖ base) [B, T] that the return is penalised with (``kl_estimator``)."""
        return kl_penalty(rollout.logprobs, rollout.ref_logprobs, rollout.kl, rollout.response_mask, self.kl_estimator)

    def stats(self) -> dict[str, Tensor]:
        """The algorithm's state worth watching, logged as ``train/<name>`` after each RL step."""
        return {"kl_coef": self.kl_coef, "kl_loss_coef": self.kl_loss_coef}

    # ---- the update schedule ----

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
