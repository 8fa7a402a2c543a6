"""Learning tests: each RL algorithm (RLOO, PPO, Quark in its documented config) trains an adapter through a real Lightning
``Trainer`` on a tiny in-process base and a synthetic reward the base scores poorly on, and the reward of the tailored
policy on held-out prompts rises by a stated margin within a bounded number of rollouts (seconds on CPU, seed 0). The loss
terms of each run's first rollout are pinned, so that a silent change to the maths fails here even while learning still works.

The base is the tiny GPT-2 of ``tests/model_families.py`` (untied N(0, 0.5²) head: peaked, yet its samples vary). The tiny
Llama of ``conftest.py`` does not fit: its tied N(0, 1) head makes it repeat one token, so the k samples of a prompt are the
same text and a leave-one-out baseline leaves no advantage. The adapter is its first layer with a fresh, zero-initialised
head (``head='zeros'``): the tailored policy starts exactly at the base, so ``val/reward/base``, drawn with the same seed on
the same prompts, is the held-out reward before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from lightning import Trainer, seed_everything

from lightning_ipa import PPO, RLOO, AdapterConfig, Algorithm, Evaluation, IPAModule, LocalBase, PromptDataModule, Quark, Reward, Sampling
from tasks.concepts import NOUNS, VERBS
from tests.model_families import save_tiny_gpt2

DIGITS = frozenset("0123456789")
BATCH_SIZE = 8  # prompts per rollout


class Digits(Reward):
    """reward = the share of a response's characters that are ASCII digits (0 for an empty response).

    The tiny base writes few digits (0.03 of its characters on the held-out prompts), but its vocabulary has digit tokens
    ("4", "12", "345", "6789", ...) that an adapter can learn to favour: a reward that is poor at the start and learnable.
    """

    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict]) -> dict[str, torch.Tensor]:
        return {"reward": torch.tensor([sum(c in DIGITS for c in r) / max(len(r), 1) for r in responses])}


class Phrases(PromptDataModule):
    """96 prompts "The {noun} and the {verb}": the first 64 train, the last 32 are held out (validation)."""

    def setup(self, stage: Optional[str] = None) -> None:
        items = [{"prompt": f"The {noun} and the {verb}", "meta": {}} for noun, verb in zip(NOUNS, VERBS * 2)][:96]
        self.splits = {"train": items[:64], "val": items[64:]}


@dataclass(frozen=True)
class Case:
    """One algorithm's learning run and what it must show."""

    algorithm: Callable[[], Algorithm]
    rollouts: int  # RL steps, each 8 prompts × 4 samples, then 2 epochs × 2 minibatches of 16: 4 optimizer steps
    min_rise: float  # the tailored policy's held-out reward after training exceeds the base's by at least this much
    first_rollout: list[dict[str, float]]  # the loss and its logged terms in each of the first rollout's 4 updates (pinned)


# All three use the configs' rollout and update shapes (conf/quickstart.yaml, conf/algorithms/*.yaml: 8 prompts × 4 samples,
# 2 epochs × minibatches of 16), 6 new tokens, and learning rates for a 1-layer adapter (1e-2 for its layer, 5e-2 for its
# fresh head, Quark's control codes and PPO's value head). Held-out reward at seed 0: 0.030 before, after RLOO 1.000,
# PPO 1.000, Quark 0.626. The margins hold with room to spare for seeds 0-11 (lowest after training: RLOO 0.999, PPO 0.827,
# Quark 0.478), so a platform whose floating-point rounding sends a run down another path still passes (on 1 thread
# instead of 2, rounding alone takes PPO's run elsewhere: 0.779).
#
# The pinned values were produced by this file's own run (seed 0, torch 2.13 CPU, transformers 5.24; 1 and 2 threads agree
# to 1e-6 relative) at the commit that added it. The first update reads the base's own samples before any step (ratio 1, KL 0);
# the three after it read a policy that AdamW moved (clipped ratios, KL to the base). They may change only with a
# deliberate change of the maths (the sampler, the reward's scores, advantages, a loss term, the update, the minibatch
# order) or of the tiny base's weights: then rerun, check why each value moved, and pin the new ones.
CASES = {
    # The quickstart's RLOO (leave-one-out baseline) without its adaptive KL penalty: the update alone learns here
    # (the penalty and its direct gradient are tested in test_algorithms.py).
    "rloo": Case(
        lambda: RLOO(samples_per_prompt=4, epochs=2, minibatch_size=16, kl_coef=0.0),
        rollouts=20, min_rise=0.6,
        first_rollout=[
            {"loss": 0.006301106, "policy": 0.006301106, "entropy": 3.334977, "clip_fraction": 0.0},
            {"loss": -0.006164583, "policy": -0.006164583, "entropy": 3.26368, "clip_fraction": 0.2842105},
            {"loss": 0.01823942, "policy": 0.01823942, "entropy": 3.221633, "clip_fraction": 0.6},
            {"loss": -0.03113886, "policy": -0.03113886, "entropy": 3.043973, "clip_fraction": 0.4583333},
        ],
    ),
    # conf/algorithms/ppo.yaml: a value head instead of the leave-one-out baseline, no KL penalty. Its critic starts at
    # zero, so it gets a few more rollouts than RLOO (after 20, seed 11 reached only 0.633).
    "ppo": Case(
        lambda: PPO(samples_per_prompt=4, epochs=2, minibatch_size=16, kl_coef=0.0),
        rollouts=30, min_rise=0.6,
        first_rollout=[
            {"loss": 0.1639369, "policy": 0.1638985, "value": 0.0003836471, "entropy": 3.367047, "clip_fraction": 0.0,
             "value_clip_fraction": 0.0},
            {"loss": -0.05198875, "policy": -0.06367909, "value": 0.1169034, "entropy": 3.158834, "clip_fraction": 0.3541667,
             "value_clip_fraction": 0.01041667},
            {"loss": -0.08946576, "policy": -0.09054876, "value": 0.01083, "entropy": 3.133742, "clip_fraction": 0.8229167,
             "value_clip_fraction": 0.0},
            {"loss": -0.01152877, "policy": -0.01904291, "value": 0.07514133, "entropy": 3.379795, "clip_fraction": 0.8333333,
             "value_clip_fraction": 0.0},
        ],
    ),
    # conf/algorithms/quark.yaml as it is: 5 quantiles, a pool of 4096 (a run this short never evicts from it), KL 0.05,
    # entropy 0.06, the control code added to every token. Quark learns from a pool that stays mostly the base's samples,
    # so it needs more rollouts than RLOO and PPO.
    "quark": Case(
        lambda: Quark(quantiles=5, pool_size=4096, samples_per_prompt=4, epochs=2, minibatch_size=16, kl_loss_coef=0.05,
                      entropy_coef=0.06, control="every_token"),
        rollouts=60, min_rise=0.3,
        first_rollout=[
            {"loss": 3.053005, "nll": 3.256708, "entropy": 3.395053, "kl": 0.0},
            {"loss": 3.27546, "nll": 3.461771, "entropy": 3.219178, "kl": 0.1368046},
            {"loss": 2.781794, "nll": 2.981198, "entropy": 3.441145, "kl": 0.1412998},
            {"loss": 2.098962, "nll": 2.265153, "entropy": 3.075003, "kl": 0.3661844},
        ],
    ),
}


@dataclass
class Run:
    """What a learning run produced."""

    base: float  # held-out mean reward of the base alone (= the tailored policy before training)
    tailored: float  # held-out mean reward of the tailored policy after training
    updates: list[dict[str, float]]  # every update's loss and logged terms, in order


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    return str(save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2")))


@pytest.fixture(scope="module", params=list(CASES))
def run(request, tiny_gpt2, tmp_path_factory) -> tuple[Case, Run]:
    """``CASES[name]`` trained by ``trainer.fit`` from seed 0 and validated once, at its end, on the held-out prompts
    (4 samples per prompt and policy)."""
    case = CASES[request.param]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PL_GLOBAL_SEED", "0")  # restored afterwards (seed_everything sets it)
        seed_everything(0, verbose=False)  # before the module: Quark draws its control codes at construction
        module = IPAModule(
            LocalBase(tiny_gpt2, dtype="float32"), Digits(), case.algorithm(), evaluation=Evaluation(val_samples_per_prompt=4),
            adapter=AdapterConfig(num_layers=1, head="zeros"), sampling=Sampling(max_new_tokens=6), lr=1e-2, head_lr=5e-2,
        )
        updates = []
        loss = type(module.algorithm).loss

        def recorded(algorithm, evaluation, experience):
            out = loss(algorithm, evaluation, experience)
            updates.append({"loss": out.loss.item(), **{name: value.item() for name, value in out.stats.items()}})
            return out

        patch.setattr(type(module.algorithm), "loss", recorded)  # on the class: the algorithm stays picklable, as hparams need
        trainer = Trainer(
            accelerator="cpu", devices=1, max_steps=case.rollouts * module.algorithm.updates_per_rollout(BATCH_SIZE),
            val_check_interval=case.rollouts, check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path_factory.mktemp(f"learning_{request.param}"),
        )
        trainer.fit(module, datamodule=Phrases(batch_size=BATCH_SIZE))
    metrics = trainer.callback_metrics
    return case, Run(metrics["val/reward/base"].item(), metrics["val/reward/tailored"].item(), updates)


def test_the_held_out_reward_rises_by_the_stated_margin(run):
    """The base scores poorly on the held-out prompts, and after ``rollouts`` RL steps the tailored policy, drawn with the
    same seed on the same prompts, scores at least ``min_rise`` more: the adapter's updates raised the reward."""
    case, result = run
    assert len(result.updates) == case.rollouts * 4  # every rollout trained: 2 epochs × 2 minibatches
    assert result.base < 0.05
    assert result.tailored >= result.base + case.min_rise, f"held-out reward {result.base:.3f} → {result.tailored:.3f}"


def test_the_first_rollouts_loss_terms_are_pinned(run):
    """The loss and its logged terms in each update of the first rollout are the pinned values: the first update scores
    the base's own samples before any step, the three after it a policy that the updates moved."""
    case, result = run
    assert len(result.updates) >= len(case.first_rollout)
    for update, (got, pinned) in enumerate(zip(result.updates, case.first_rollout)):
        assert got == pytest.approx(pinned, rel=1e-4, abs=1e-6), f"update {update + 1} of the first rollout's 4"
