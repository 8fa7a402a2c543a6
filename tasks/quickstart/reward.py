"""Reward: share of the given words used × a no-repetition term; a word counts as used as ``tasks.concepts`` matches it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ipa.metrics import distinct_ratio
from lightning_ipa.rewards import Reward
from tasks.concepts import Matching, coverage


class ConceptCoverage(Reward):
    """reward = coverage × no_repetition − repetition_penalty × (1 − distinct-2), no_repetition = distinct-2^repetition_power.

    Coverage alone is hacked by word lists that repeat the concepts; the distinct-2 factor
    (distinct word bigrams / bigrams of the response) makes repetition cost reward, and the
    penalty makes it cost even in responses that cover no concept (where the factor cannot).
    Coverage is in any order with the ``"lenient"`` matching by default (the quickstart is our task, not IPA's; its
    numbers were measured so): "Dog runs" covers dog and run, where IPA's matching covers run only.
    """

    names = ("coverage", "no_repetition")

    def __init__(self, repetition_power: float = 1.0, repetition_penalty: float = 0.0, matching: Matching = "lenient"):
        """
        Args:
            repetition_power: Exponent of the distinct-2 factor (0: coverage alone).
            repetition_penalty: Weight of the additive (1 − distinct-2) penalty (0: off).
            matching: How a concept is matched: 'lenient' (lower-cased words, any lemma) or 'ipa' (IPA's CommonGen
                reward: whitespace tokens, one lemma each, case kept).
        """
        self.repetition_power = repetition_power
        self.repetition_penalty = repetition_penalty
        self.matching = matching

    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        cov = torch.tensor([coverage(m["concepts"], r, matching=self.matching) for m, r in zip(meta, responses)])
        distinct = torch.tensor([distinct_ratio(r, 2) for r in responses])
        no_repetition = distinct**self.repetition_power  # distinct-2^power: 1 without a repeated bigram (not a fluency judge)
        return {"reward": cov * no_repetition - self.repetition_penalty * (1 - distinct), "coverage": cov, "no_repetition": no_repetition}
