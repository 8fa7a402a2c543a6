"""Reward: share of the given words used (matched by lemma) × a no-repetition term."""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from typing import Any

import torch
from lemminflect import getAllLemmas
from torch import Tensor

from lightning_ipa.metrics import distinct_ratio, ngrams, words
from lightning_ipa.rewards import Reward


@lru_cache(maxsize=65536)
def lemmas(word: str) -> frozenset[str]:
    """The word and all its lemmas under any part of speech (``ran`` → {ran, run})."""
    return frozenset({word, *(lemma for forms in getAllLemmas(word).values() for lemma in forms)})


def coverage(concepts: list[str], text: str) -> float:
    """Share of concepts that some word of ``text`` shares a lemma with."""
    found = set().union(*(lemmas(w) for w in words(text)))
    return sum(bool(lemmas(c.lower()) & found) for c in concepts) / len(concepts)


def novelty(prompts: list[str], responses: list[str]) -> list[float]:
    """Per response, the share of its word bigrams that no response to another prompt of the batch has."""
    by_prompt: dict[str, Counter] = {}
    for prompt, response in zip(prompts, responses):
        by_prompt.setdefault(prompt, Counter()).update(set(ngrams(response, 2)))
    everywhere = sum(by_prompt.values(), Counter())
    shares = []
    for prompt, response in zip(prompts, responses):
        grams = set(ngrams(response, 2))
        elsewhere = sum(everywhere[g] > by_prompt[prompt][g] for g in grams)
        shares.append(1 - elsewhere / len(grams) if grams else 1.0)
    return shares


class ConceptCoverage(Reward):
    """reward = coverage × fluency − repetition_penalty × (1 − distinct-2), where
    fluency = distinct-2^repetition_power × novelty^novelty_power.

    Coverage alone is hacked by word lists that repeat the concepts; the distinct-2 factor
    (distinct word bigrams / bigrams of the response) makes repetition cost reward, and the
    penalty makes it cost even in responses that cover no concept (where the factor cannot).
    Without repetition it is hacked by one template that lists the words for every prompt
    ("… three words: mouse, river, and bake."); novelty (the share of a response's bigrams
    that no response to another prompt in the batch has) makes a shared template cost reward.
    """

    names = ("coverage", "fluency", "novelty")

    def __init__(self, repetition_power: float = 1.0, repetition_penalty: float = 0.0, novelty_power: float = 0.0):
        """
        Args:
            repetition_power: Exponent of the distinct-2 factor (0: off).
            repetition_penalty: Weight of the additive (1 − distinct-2) penalty (0: off).
            novelty_power: Exponent of the novelty factor (0: off).
        """
        self.repetition_power = repetition_power
        self.repetition_penalty = repetition_penalty
        self.novelty_power = novelty_power

    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        cov = torch.tensor([coverage(m["concepts"], r) for m, r in zip(meta, responses)])
        distinct = torch.tensor([distinct_ratio(r, 2) for r in responses])
        new = torch.tensor(novelty(prompts, responses))
        fluency = distinct**self.repetition_power * new**self.novelty_power
        reward = cov * fluency - self.repetition_penalty * (1 - distinct)
        return {"reward": reward, "coverage": cov, "fluency": fluency, "novelty": new}
