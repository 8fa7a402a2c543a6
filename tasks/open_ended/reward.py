"""The diversity reward of open-ended generation; coherence and fluency are the engine's rewards."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from lightning_ipa.metrics import distinct_ratio
from lightning_ipa.rewards import Reward


def diversity(text: str, ns: Sequence[int] = (2, 3, 4)) -> float:
    """Π over n in ``ns`` of distinct-n of the text's words, i.e. Π (1 − rep-n) (Su et al. 2022).

    distinct-n = distinct word n-grams / word n-grams (words: lower-cased ``\\w+``); a text with no
    n-gram (fewer than n words) has distinct-n = 0, so a response too short to judge scores 0.
    """
    return math.prod(distinct_ratio(text, n) for n in ns)


class Diversity(Reward):
    """reward = Π over n in ``ns`` of distinct-n of the response's words (1: no repeated n-gram; 0: no n-gram at all).

    For n = 2, 3, 4 this is the diversity of contrastive search and contrastive decoding, Π (1 − rep-n).
    Each distinct-n is reported too (``distinct_<n>``).
    """

    def __init__(self, ns: Sequence[int] = (2, 3, 4)):
        """
        Args:
            ns: The n of the distinct-n multiplied together.
        """
        if not ns or any(n < 1 for n in ns):
            raise ValueError(f"ns must be a non-empty list of n ≥ 1, got {list(ns)}")
        self.ns = tuple(ns)
        self.names = tuple(f"distinct_{n}" for n in self.ns)

    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        ratios = torch.tensor([[distinct_ratio(text, n) for n in self.ns] for text in responses], dtype=torch.float32)
        ratios = ratios.reshape(len(responses), len(self.ns))  # [B, len(ns)]
        return {"reward": ratios.prod(-1), **{name: ratios[:, i] for i, name in enumerate(self.names)}}
