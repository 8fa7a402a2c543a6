"""torchmetrics Metrics shared by tasks."""

from __future__ import annotations

import re

import torch
from torchmetrics import Metric

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return WORD.findall(text.lower())


def distinct_ratio(text: str, n: int) -> float:
    """Distinct n-grams / n-grams of one text's words (0 when it has no n-gram)."""
    tokens = words(text)
    ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


class DistinctN(Metric):
    """distinct-n: per generation, distinct n-grams over n-grams (1 = no repetition), averaged."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, n: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.n = n
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, texts: list[str]) -> None:
        self.total += sum(distinct_ratio(t, self.n) for t in texts)
        self.count += len(texts)

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()
