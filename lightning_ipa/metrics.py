"""torchmetrics Metrics shared by tasks."""

from __future__ import annotations

import hashlib
import re

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return WORD.findall(text.lower())


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The word n-grams of ``text``, in order."""
    tokens = words(text)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_ratio(text: str, n: int) -> float:
    """Distinct n-grams / n-grams of one text's words (0 when it has no n-gram)."""
    grams = ngrams(text, n)
    return len(set(grams)) / len(grams) if grams else 0.0


class TextMetric(Metric):
    """A metric updated with the generated texts themselves (rather than with scores)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False


class DistinctN(TextMetric):
    """distinct-n: per generation, distinct n-grams over n-grams (1 = no repetition), averaged."""

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


class CorpusDistinctN(TextMetric):
    """Corpus distinct-n (Li et al. 2016): distinct n-grams of all generations over their n-grams.

    Low when generations share phrasing across prompts, e.g. one template with the prompt's
    words filled in, which per-generation distinct-n cannot see. N-grams are kept as stable
    64-bit hashes, so ranks agree under DDP.
    """

    def __init__(self, n: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.n = n
        self.add_state("hashes", [], dist_reduce_fx="cat")

    def update(self, texts: list[str]) -> None:
        grams = [" ".join(gram) for text in texts for gram in ngrams(text, self.n)]
        self.hashes.append(torch.tensor([stable_hash(g) for g in grams], dtype=torch.long, device=self.device))

    def compute(self) -> torch.Tensor:
        if isinstance(self.hashes, list) and not self.hashes:  # never updated (after a DDP sync: one tensor)
            return torch.tensor(0.0)
        hashes = dim_zero_cat(self.hashes)
        return torch.tensor(hashes.unique().numel() / max(hashes.numel(), 1))


def stable_hash(text: str) -> int:
    """A signed 64-bit hash of ``text`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
