"""Reward: share of the given words used (matched by lemma) × a no-repetition term."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from lemminflect import getAllLemmas
from torch import Tensor

from lightning_ipa.metrics import distinct_ratio, words
from lightning_ipa.rewards import Reward


@lru_cache(maxsize=65536)
def lemmas(word: str) -> frozenset[str]:
    """The word and all its lemmas under any part of speech (``ran`` → {ran, run})."""
    return frozenset({word, *(lemma for forms in getAllLemmas(word).values() for lemma in forms)})


def coverage(concepts: list[str], text: str) -> float:
    """Share of concepts that some word of ``text`` shares a lemma with."""
    found = set().union(*(lemmas(w) for w in words(text)))
    return sum(bool(lemmas(c.lower()) & found) for c in concepts) / len(concepts)


class ConceptCoverage(Reward):
    """reward = coverage × distinct-2^repetition_power − repetition_penalty × (1 − distinct-2).

    Coverage alone is hacked by word lists that repeat the concepts; the distinct-2 factor
    (distinct word bigrams / bigrams of the response) makes repetition cost reward, and the
    penalty makes it cost even in responses that cover no concept (where the factor cannot).
    """

    names = ("coverage", "fluency")

    def __init__(self, repetition_power: float = 1.0, repetition_penalty: float = 0.0):
        """
        Args:
            repetition_power: Exponent of the distinct-2 factor (0: coverage alone).
            repetition_penalty: Weight of the additive (1 − distinct-2) penalty (0: off).
        """
        self.repetition_power = repetition_power
        self.repetition_penalty = repetition_penalty

    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        cov = torch.tensor([coverage(m["concepts"], r) for m, r in zip(meta, responses)])
        distinct = torch.tensor([distinct_ratio(r, 2) for r in responses])
        fluency = distinct**self.repetition_power
        return {"reward": cov * fluency - self.repetition_penalty * (1 - distinct), "coverage": cov, "fluency": fluency}
