"""IPAModule: the frozen base, the trainable adapter and the reward-driven RL step."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning import Callback, LightningModule
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LRSchedulerCallable
from torch import Tensor, nn

from .adapters import Adapter, AdapterConfig
from .algorithms import RLOO, Algorithm
from .bases import LocalBase
from .callbacks import FitSummary, RolloutProgressBar, completed_rollouts
from .data import PromptBatch, PromptDataModule, repeat_prompts
from .evaluation import Evaluation, Stage
from .experts import LogitArithmetic
from .policy import RolloutMemory, Sampling, TailoredPolicy, long_prompts_error
from .remote import RemoteBase
from .rewards import Reward, RewardContractError, check_scores
from .types import Experience, LossOutput, Responses, Rollout

FROZEN = ("policy.base.", "reward.", "evaluation.", "compare.")  # state_dict prefixes rebuilt at start-up, never checkpointed


class IPAModule(LightningModule):
    """Inference-time Policy Adapters (Lu et al., "Inference-Time Policy Adapters (IPA): Tailoring Extreme-Scale LMs
    without Fine-tuning", EMNLP 2023): trains an adapter so that the tailored policy, base ⊗ adapter^α, maximises a reward.

    ``training_step`` is one RL step (docs/architecture.md); validation, test and predict are the ``Evaluation``'s.
    Under manual optimisation: one optimizer step per minibatch update, the learning-rate scheduler stepped once per
    rollout.
    """

    def __init__(
        self,
        base: Union[LocalBase, RemoteBase],
        reward: Reward,
        algorithm: Optional[Algorithm] = None,
        evaluation: Optional[Evaluation] = None,
        adapter: AdapterConfig = AdapterConfig(),
        alpha: float = 1.0,
        sampling: Sampling = Sampling(),
        rollout_top_p: Optional[float] = None,
        rollout_memory: RolloutMemory = "auto",
        lr: float = 1e-4,
        head_lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        max_grad_norm: Optional[float] = 1.0,
        missing_eos_penalty: Optional[float] = None,
        eval_seed: int = 1234,
        num_logged_samples: int = 8,
        max_rollouts: Optional[int] = None,
        compare: Optional[list[LogitArithmetic]] = None,
    ):
        """
        Args:
            base: The frozen base LM (never trained, never checkpointed): a local model, or with
                ``class_path: lightning_ipa.RemoteBase`` one behind an API that returns top-k log-probs.
            reward: What the tailored policy should maximise.
            algorithm: The RL algorithm that trains the adapter (None: RLOO with its defaults).
            evaluation: What validation, test and predict sample and measure, and what callbacks show of it (None: one
                sample per prompt; mean reward and its parts, distinct-2, corpus distinct-2). Tasks bring their own protocol.
            adapter: How to build the adapter.
            alpha: Weight α of the adapter in log_softmax(base) + α·adapter.
            sampling: Decoding settings for rollouts, validation, test and predict.
            rollout_top_p: Nucleus mass of the training rollouts only (None: ``sampling.top_p``); e.g. 1.0
                explores the whole tailored distribution, as Quark does, while evaluation keeps top-p.
            rollout_memory: How a rollout keeps the base's distributions for the update
                (``TailoredPolicy.rollout_memory``): 'full' (float32 [B, T, V]), 'bfloat16', 'top_k' (exact for a top-k
                or API base), 'recompute' (the base reads each minibatch again before its update), or 'auto' (the
                default: 'top_k' for a top-k base, else 'full' up to 4 GiB a rollout, else 'recompute').
            lr: Learning rate of the adapter's transformer layers.
            head_lr: Learning rate of what starts from scratch: the adapter's output head and control
                codes, and the algorithm's own parameters (e.g. PPO's value head).
            weight_decay: AdamW weight decay.
            lr_scheduler: A torch scheduler over both learning rates, stepped once per rollout
                (None: constant), e.g. ``class_path: torch.optim.lr_scheduler.CosineAnnealingLR``.
            max_grad_norm: Gradient-norm clip per update (None: off).
            missing_eos_penalty: Subtracted from the training reward of responses cut at
                ``max_new_tokens`` before EOS (None: off); favours finished answers over run-ons.
            eval_seed: Seed of validation/test/predict sampling, so every evaluation sees the same draws.
            num_logged_samples: Validation samples shown in TensorBoard's text table.
            max_rollouts: How long ``fit`` trains, in rollouts (RL steps: a batch of prompts sampled, scored and learned
                from), whatever the algorithm's epochs and minibatches; a resumed run counts the rollouts it has done.
                None: ``trainer.max_steps`` (optimizer steps: rollouts × epochs × minibatches) or ``max_epochs`` decide.
                Setting it and ``trainer.max_steps`` too is refused (``setup``). ``max_epochs`` still applies: the CLI
                sets it to -1 (no limit) when neither is given; with a ``Trainer`` of your own, pass ``max_epochs=-1``.
            compare: Training-free policies that ``test`` measures beside the base and the tailored policy, each its own
                column of the results (``test/<metric>/<name>``): the same prompts, seeds, sampling settings and metrics.
                E.g. ``class_path: lightning_ipa.DExperts`` (expert, anti-expert, α) or ``lightning_ipa.ProxyTuning``
                (tuned, untuned); their models are frozen, read the base's tokens and are never checkpointed.

        Raises:
            ValueError: ``rollout_top_p`` outside (0, 1], ``max_rollouts`` below 1, a sampled ``kl_estimator`` with
                filtered rollouts, a ``rollout_memory`` the base cannot use (``TailoredPolicy.rollout_memory``), or
                ``compare`` policies with one name twice or models of another vocabulary than the base's.
        """
        if rollout_top_p is not None and not 0 < rollout_top_p <= 1:
            raise ValueError(f"rollout_top_p must be in (0, 1] (or None for sampling.top_p), got {rollout_top_p}")
        if max_rollouts is not None and max_rollouts < 1:
            raise ValueError(f"max_rollouts must be ≥ 1 (or None: trainer.max_steps or max_epochs decide), got {max_rollouts}")
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints leave frozen weights (the base above all) out
        self.compare = nn.ModuleList(compare or [])
        names = [c.name for c in self.compare]
        if len(set(names)) < len(names):
            raise ValueError(f"compare: policy names {names} repeat; give each its own name (init_args.name), its results column")
        for policy in self.compare:
            policy.check(base)
        # the compared policies' models read the same prompts: their context windows bound them too
        readers = {f"compare {c.name}": c.max_positions for c in self.compare}
        self.policy = TailoredPolicy(base, Adapter.build(adapter, base), alpha, sampling, readers)
        self.policy.rollout_memory(1, rollout_memory)  # refuses an unknown mode, or 'top_k' for a full-vocabulary base, now
        self.reward = reward
        self.algorithm = algorithm or RLOO()
        rollout_filtered = sampling.top_k > 0 or (sampling.top_p if rollout_top_p is None else rollout_top_p) < 1
        if rollout_filtered and self.algorithm.kl_estimator != "full":
            raise ValueError(
                f"kl_estimator={self.algorithm.kl_estimator!r} estimates KL(tailored ‖ base) from tokens drawn from the tailored "
                "policy itself, but the rollouts are drawn through top-k/top-p: use kl_estimator='full' (exact), or "
                "unfiltered rollouts (model.rollout_top_p=1.0 and sampling.top_k=0)"
            )
        self.algorithm.setup(self.policy.adapter)
        self.evaluation = evaluation or Evaluation()
        self.evaluation.setup(self.reward.names, eval_seed, num_logged_samples, names)
        self.compared: dict[str, TailoredPolicy] = {}  # the compare policies, as built for a test (on_test_epoch_start)
        self.lr_scheduler = lr_scheduler

    @property
    def tokenizer(self):
        return self.policy.base.tokenizer

    # ---- one RL step ----

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """One RL step on a batch of prompts (docs/architecture.md): sample → score → experience → KL control → updates → log."""
        rollout = self.sample(batch)  # 1. k responses per prompt from base ⊗ adapter^α; the base runs once per token
        scores = self.score(repeat_prompts(batch, self.algorithm.samples_per_prompt), self.decode(rollout))  # 2. reward and parts [B]
        rewards = self.shaped_reward(rollout, scores["reward"])
        experience = self.algorithm.make_experience(rollout, rewards)  # 3. advantages and returns; Quark: a batch replayed from its pool
        self.algorithm.control_kl(rollout)  # 4. the adaptive KL coefficient, towards kl_target
        stats = [self.update(minibatch, batch_idx, i) for i, minibatch in enumerate(self.algorithm.minibatches(experience))]  # 5.
        self.log_training(rollout, scores, stats)  # 6. log the rollout and its updates, then step the learning rates
        self.step_lr_scheduler()

    def sample(self, batch: PromptBatch) -> Rollout:
        """The rollout of a batch of N prompts: ``samples_per_prompt`` = k responses per prompt from the tailored policy
        (``TailoredPolicy.sample``, nucleus ``rollout_top_p``), each prompt's in consecutive rows: a ``Rollout`` of N·k rows."""
        prompts = self.policy.encode(batch["prompt"])
        k, top_p, memory = self.algorithm.samples_per_prompt, self.hparams.rollout_top_p, self.hparams.rollout_memory
        return self.policy.sample(prompts, samples_per_prompt=k, top_p=top_p, memory=memory)

    def decode(self, rollout: Union[Rollout, Responses]) -> list[str]:
        """Response texts (``TailoredPolicy.decode``; for rewards and logs only: training uses the token ids)."""
        return self.policy.decode(rollout.response_ids, rollout.response_mask)

    def score(self, batch: PromptBatch, responses: list[str]) -> dict[str, Tensor]:
        """Scores [B] (float32, on this module's device) by name; a reward output that breaks the contract
        (``rewards.Reward``: a mapping with ``reward``, one finite number per response) stops the run here.

        Raises:
            RewardContractError: what was wrong, for which sample, and when (stage, global step).
        """
        prompts = batch["prompt"]
        try:
            scores = check_scores(self.reward, self.reward(prompts, responses, batch["meta"]), prompts, responses)
        except RewardContractError as error:  # from this reward, or from a part of it (ComposedReward)
            stage = None if self._trainer is None else self.trainer.state.stage
            error.when = "" if stage is None else f"{stage.value}, global step {self.global_step}"
            raise
        return {name: value.to(self.device) for name, value in scores.items()}

    def shaped_reward(self, rollout: Rollout, reward: Tensor) -> Tensor:
        """The task's ``reward`` [B], less ``missing_eos_penalty`` for the responses of ``rollout`` that never ended: [B]."""
        if self.hparams.missing_eos_penalty is None:
            return reward
        return reward - self.hparams.missing_eos_penalty * (~self.ended(rollout)).float()

    def ended(self, rollout: Union[Rollout, Responses]) -> Tensor:
        """[B] whether each response ended with a stop token (rather than at ``max_new_tokens``)."""
        return self.policy.ended(rollout.response_ids, rollout.response_mask)

    def update(self, minibatch: Experience, batch_idx: int, update: int) -> dict[str, Tensor]:
        """One optimizer step of the adapter on a minibatch: the policy's forward pass, the algorithm's loss, a
        non-finite check, backward, gradient clipping (``max_grad_norm``), step. Samples without the base's
        distributions (``Responses`` Quark replays from its pool, a rollout sampled with ``rollout_memory='recompute'``)
        are read by the base first (``TailoredPolicy.read``): one minibatch's [m, T, V] at a time, once per epoch.

        Args:
            minibatch: Rows of the rollout's experience (``Algorithm.minibatches``).
            batch_idx: The rollout's batch index, and ``update`` the update's index in the rollout (for messages).

        Returns:
            The loss's stats (detached scalars by name).

        Raises:
            FloatingPointError: a non-finite loss (``check_finite``), before anything reaches the weights.
        """
        optimizer = self.optimizers()
        samples = minibatch.samples
        if samples.base_distribution is None:  # Quark's replays, rollout_memory='recompute': the base reads this minibatch
            samples = self.policy.read(samples)
        loss = self.algorithm.loss(self.policy(samples, with_kl=self.algorithm.needs_exact_kl), minibatch)
        self.check_finite(loss, batch_idx, update)
        optimizer.zero_grad()
        self.manual_backward(loss.loss)
        self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm)
        optimizer.step()
        return loss.stats

    def check_finite(self, loss: LossOutput, batch_idx: int, update: int) -> None:
        """Stop the run before a non-finite loss reaches the adapter's weights (through ``optimizer.step()``).

        Raises:
            FloatingPointError: the loss is NaN or ±inf; the message names the rollout, the update, the loss's stats
                and the likely causes.
        """
        if torch.isfinite(loss.loss).all():
            return
        stats = ", ".join(f"{name}={value.float().mean().item():.4g}" for name, value in loss.stats.items())
        adapter = "finite" if all(torch.isfinite(p).all() for p in self.policy.adapter.parameters()) else "NOT finite"
        earlier = f" (the rollout's {update} earlier updates were applied)" if update else ""
        raise FloatingPointError(
            f"non-finite loss {loss.loss.item()} in update {update} of the rollout of batch_idx {batch_idx}, epoch {self.current_epoch} "
            f"(global step {self.global_step}), stopped before its optimizer step: nothing of it reached the adapter{earlier}. "
            f"Loss stats: {stats or 'none'}. The adapter's parameters are {adapter}. Likely causes: a learning rate "
            "too high (model.lr, model.head_lr) or no gradient clip (model.max_grad_norm), a huge KL coefficient or "
            "rewards of a huge scale (normalise them), half precision overflowing (trainer.precision: 32-true), or an "
            "algorithm's setting that divides by ~0 (e.g. advantages whitened over identical rewards)."
        )

    def log_training(self, rollout: Rollout, scores: dict[str, Tensor], losses: list[dict[str, Tensor]]) -> None:
        """Log the rollout (``train/``: scores, exact KL, response length, share ended, the algorithm's ``stats``,
        learning rates) and the mean of each loss stat over its updates (``loss/``), at step = this rollout's number."""
        n = len(rollout.response_ids)
        logs = {f"train/{name}": value.mean() for name, value in scores.items()}
        logs["train/kl"] = rollout.kl.sum(-1).mean()
        logs.update({f"train/{name}": value.to(self.device) for name, value in self.algorithm.stats().items()})
        logs["train/response_length"] = rollout.response_mask.sum(-1).float().mean()
        logs["train/ended"] = self.ended(rollout).float().mean()
        if self.policy.sampling.long_prompts == "cut_left":
            logs["train/prompts_cut"] = torch.tensor(float(self.policy.last_cut), device=self.device)  # of this rollout's prompts
        logs.update({f"loss/{key}": torch.stack([stats[key] for stats in losses]).mean() for key in losses[0]})
        body, head = self.optimizers().optimizer.param_groups  # configure_optimizers' two groups
        logs["train/lr"], logs["train/head_lr"] = torch.tensor(body["lr"]), torch.tensor(head["lr"])
        logs["step"] = torch.tensor(float(completed_rollouts(self.trainer) + 1))  # TensorBoard's step: this rollout's number
        shown = {"train/reward", "train/kl"}
        self.log_dict({k: v for k, v in logs.items() if k in shown}, batch_size=n, prog_bar=True)
        self.log_dict({k: v for k, v in logs.items() if k not in shown}, batch_size=n)

    def step_lr_scheduler(self) -> None:
        """Move the learning rates on, once per rollout (after logging the ones it used); manual optimisation leaves
        stepping the scheduler to us."""
        if (scheduler := self.lr_schedulers()) is not None:
            scheduler.step()

    # ---- evaluation: the base alone and the tailored policy on the same prompts (``Evaluation``) ----

    def eval_batch_index(self, batch_idx: int) -> int:
        """The index in one process's order of this rank's ``batch_idx``-th evaluation batch: ``EvalShards``
        deals one process's batches round-robin, so it is ``batch_idx · world_size + global_rank``."""
        world_size = self._trainer.world_size if self._trainer is not None else 1
        return batch_idx * world_size + self.global_rank

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.log_evaluation(batch, batch_idx, "val")

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.log_evaluation(batch, batch_idx, "test")

    def log_evaluation(self, batch: PromptBatch, batch_idx: int, stage: Stage) -> None:
        """``Evaluation.evaluate`` on a batch, its metrics logged (and how many prompts were cut to fit, summed)."""
        others = self.compared if stage == "test" else {}
        metrics = self.evaluation.evaluate(self.policy, self.score, batch, self.eval_batch_index(batch_idx), stage, others)
        if self.policy.sampling.long_prompts == "cut_left":  # of the generation just done
            self.log(f"{stage}/prompts_cut", float(self.policy.last_cut), reduce_fx="sum", batch_size=len(batch["prompt"]))
        self.log_dict(metrics, batch_size=len(batch["prompt"]))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:  # at the step of the rollout it follows
            self.log("step", float(completed_rollouts(self.trainer)), sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self.evaluation.generations = []
        self.compared = {c.name: c.policy(self.policy.base, self.policy.sampling) for c in self.compare}

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict[str, Any]]:
        return self.evaluation.predict(self.policy, self.score, batch, self.eval_batch_index(batch_idx))

    # ---- optimisation and checkpoints ----

    def configure_callbacks(self) -> list[Callback]:
        """``FitSummary``, and a ``RolloutProgressBar`` in place of a plain ``RichProgressBar`` (Lightning's default, or
        one configured, whose settings it keeps); another kind of bar stays as it is."""
        callbacks: list[Callback] = []
        bar = self.trainer.progress_bar_callback
        if type(bar) is RichProgressBar:  # Lightning's default (rich is a dependency), or one configured: same settings
            callbacks.append(RolloutProgressBar(bar.refresh_rate, bar._leave, bar.theme, bar._console_kwargs))
        return [*callbacks, FitSummary()]  # the bar's teardown first: the summary prints below it

    def updates_per_rollout(self) -> int:
        """Optimizer steps per rollout (``Algorithm.updates_per_rollout`` of the data's batch size; 1 without a ``PromptDataModule``)."""
        data = self._trainer.datamodule if self._trainer is not None else None
        return self.algorithm.updates_per_rollout(data.batch_size) if isinstance(data, PromptDataModule) else 1

    def setup(self, stage: str) -> None:
        """Refuse, before any work, inputs that would waste it: splits the stage reads that are empty or missing
        (``PromptDataModule.check_splits``; for ``fit`` the validation split too, whose loader Lightning builds only at
        the first validation), prompts too long for the context window (with ``sampling.long_prompts='refuse'``) and,
        for ``fit``, an update schedule that does not count whole rollouts. Sets the training length from
        ``max_rollouts``.

        Raises:
            ValueError: an empty split or fewer training prompts than a batch per process; prompts longer than
                ``TailoredPolicy.context_window`` (each named: index in its split, tokens); a ``minibatch_size`` that does
                not divide the samples of a rollout (``Algorithm.updates_per_rollout``); a ``trainer.max_steps`` that is
                not a whole number of rollouts (optimizer steps per rollout = epochs × minibatches), with the nearest valid
                values; ``max_rollouts`` and ``trainer.max_steps`` both set, or ``max_rollouts`` without a ``PromptDataModule``.
        """
        data = self.trainer.datamodule
        if not isinstance(data, PromptDataModule):
            if stage == "fit" and self.hparams.max_rollouts is not None:
                raise ValueError("max_rollouts counts rollouts through the data module's batch_size: use a PromptDataModule, "
                                 "or trainer.max_steps (optimizer steps) with max_rollouts=None")
            return  # dataloaders given directly: nothing to check against
        data.check_splits(stage)
        refuse_long_prompts(self.policy, data, stage)
        if stage != "fit":
            return
        steps = self.updates_per_rollout()
        max_steps = self.trainer.max_steps
        if self.hparams.max_rollouts is not None and not self.trainer.fast_dev_run:  # fast_dev_run=n: n optimizer steps
            if max_steps not in (-1, self.hparams.max_rollouts * steps):
                raise ValueError(
                    f"model.max_rollouts={self.hparams.max_rollouts} and trainer.max_steps={max_steps} both set how long fit "
                    f"trains: keep one (max_rollouts counts rollouts; max_steps counts optimizer steps, {steps} per rollout here): "
                    f"--trainer.max_steps=-1, or --model.max_rollouts=null"
                )
            self.trainer.fit_loop.epoch_loop.max_steps = max_steps = self.hparams.max_rollouts * steps  # Lightning stops on optimizer steps
        if max_steps > 0 and max_steps % steps and not self.trainer.fast_dev_run:  # fast_dev_run=n: n optimizer steps
            below = max_steps // steps * steps
            nearest = " or ".join(str(n) for n in (below, below + steps) if n > 0)
            minibatches = steps // self.algorithm.epochs
            size = self.algorithm.experience_size(data.batch_size)[0] // minibatches
            raise ValueError(
                f"trainer.max_steps={max_steps} is not a whole number of rollouts: {self.algorithm.__class__.__name__} makes "
                f"{steps} optimizer steps per rollout (epochs={self.algorithm.epochs} × {minibatches} "
                f"minibatch{'es' * (minibatches != 1)} of {size}) and Lightning stops only between rollouts, so the run would "
                f"overshoot it; set --trainer.max_steps to {nearest}"
            )

    def configure_optimizers(self) -> dict[str, Any]:
        head = self.policy.adapter.fresh_parameters() + list(self.algorithm.parameters())
        head_ids = {id(p) for p in head}
        body = [p for p in self.policy.adapter.body.parameters() if p.requires_grad and id(p) not in head_ids]
        optimizer = torch.optim.AdamW(
            [{"params": body, "lr": self.hparams.lr}, {"params": head, "lr": self.hparams.head_lr}],
            weight_decay=self.hparams.weight_decay,
        )
        if self.lr_scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}  # stepped by step_lr_scheduler

    def checkpointed_keys(self) -> set[str]:
        """The ``state_dict`` keys a checkpoint holds: what training changes (the adapter's trainable weights, the
        algorithm's parameters, buffers and pool). The frozen rest (the base, the adapter's frozen layers, rewards and
        evaluation models) is rebuilt from its own weights at start-up."""
        return {k for k in trained_keys(self) if not k.startswith(FROZEN)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        kept = self.checkpointed_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in kept}
        hparams = checkpoint.get("hyper_parameters", {})
        for name in [k for k, v in hparams.items() if holds_module(v)]:
            del hparams[name]  # a base, or compare policies, passed as objects (outside the CLI) are not saved either
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the RNG; first refuses a checkpoint whose tensors do not fit the configured module.

        Raises:
            ValueError: The checkpoint lacks tensors the configured adapter/algorithm trains, has ones it does not
                have, or has other shapes (say ``adapter.head`` or ``adapter.num_layers`` differ from training's): it
                names them. Loading it leniently would leave parts untrained without a word.
        """
        self.algorithm.upgrade_checkpoint(checkpoint["state_dict"], "algorithm.")
        self.check_fits(checkpoint["state_dict"])
        if "rng" in checkpoint:
            torch.set_rng_state(checkpoint["rng"]["torch"])
            if checkpoint["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])

    def check_fits(self, state_dict: dict[str, Any]) -> None:
        """Raise ValueError naming the keys and shapes by which a checkpoint's ``state_dict`` and ``checkpointed_keys`` differ."""
        if problems := fit_problems(self.checkpointed_keys(), state_dict, self.state_dict()):
            path = Path(self._trainer.ckpt_path) if self._trainer is not None and self._trainer.ckpt_path else None
            config = path.parents[1] / "config.yaml" if path is not None and len(path.parents) > 1 else None
            hint = f"pass --config {config}" if config is not None and config.is_file() else "use the configuration it was trained with"
            raise ValueError(
                f"the checkpoint {path or ''} does not fit the configured model (adapter, algorithm):\n  " + "\n  ".join(problems)
                + f"\nTo load it, {hint} (with your changes to decoding or evaluation after it)"
            )


def trained_keys(module: nn.Module) -> set[str]:
    """The ``state_dict`` keys of ``module`` that training may change: all but its frozen parameters'."""
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k for k in module.state_dict() if k not in frozen}


def fit_problems(expected: set[str], state_dict: dict[str, Any], own: dict[str, Any]) -> list[str]:
    """How a checkpoint's ``state_dict`` does not fit a module whose trained keys are ``expected`` and whose own
    ``state_dict`` is ``own``: keys missing, keys not configured (each listed, the first 6), tensors of other shapes."""

    def listed(keys: set[str]) -> str:
        keys_ = sorted(keys)
        return ", ".join(keys_[:6]) + (f" and {len(keys_) - 6} more" if len(keys_) > 6 else "")

    problems, saved = [], set(state_dict)
    if missing := expected - saved:
        problems.append(f"configured but not in the checkpoint: {listed(missing)}")
    if unexpected := saved - expected:
        problems.append(f"in the checkpoint but not configured: {listed(unexpected)}")
    return problems + [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} configured"
        for k, v in sorted(state_dict.items()) if k in own and torch.is_tensor(v) and torch.is_tensor(own[k]) and v.shape != own[k].shape
    ]


def holds_module(value: Any) -> bool:
    """Whether a hyperparameter is, or holds (in a list, tuple or dict), an ``nn.Module``: its weights, pickled."""
    if isinstance(value, nn.Module):
        return True
    if isinstance(value, dict):
        return any(holds_module(v) for v in value.values())
    return isinstance(value, (list, tuple)) and any(holds_module(v) for v in value)


def refuse_long_prompts(policy: TailoredPolicy, data: PromptDataModule, stage: str) -> None:
    """With ``sampling.long_prompts='refuse'``, refuse before any work the prompts of the splits ``stage`` reads that are
    longer than ``policy.context_window()`` allows (each named by its index in the split and its token count).

    Raises:
        ValueError: ``long_prompts_error``'s message, naming the split and where its prompts come from.
    """
    if policy.sampling.long_prompts != "refuse":
        return
    for split in ("train", "val") if stage == "fit" else (data.stage_split(stage),):
        prompts = [item["prompt"] for item in data.splits.get(split, [])]
        if long := policy.long_prompts(prompts):
            where = f"the {split!r} split ({data.split_source(split)})"
            raise ValueError(long_prompts_error(long, prompts, policy.context_window(), policy.sampling.max_new_tokens, where, policy.windows_text()))
