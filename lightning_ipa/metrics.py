"""torchmetrics Metrics shared by tasks, updated with the ``Samples`` of an evaluation batch."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal, NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.text import BLEUScore, ROUGEScore
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


class Samples(NamedTuple):
    """What one evaluation batch produced: k samples per prompt, with their per-sample scores."""

    prompts: list[str]  # [P]
    responses: list[str]  # [P·k] the k samples of each prompt in a row
    scores: dict[str, Tensor]  # name → [P·k] (the reward and its parts, and the evaluation's own scores)
    samples_per_prompt: int  # k
    meta: Sequence[dict[str, Any]] = ()  # [P] the prompts' meta (e.g. "references" for BLEU/ROUGE)

    def per_prompt(self, name: str) -> Tensor:
        """Score ``name`` as [P, k]."""
        return self.scores[name].reshape(len(self.prompts), self.samples_per_prompt)

    def groups(self) -> list[list[str]]:
        """The responses of each prompt [P][k]."""
        k = self.samples_per_prompt
        return [self.responses[i : i + k] for i in range(0, len(self.responses), k)]

    def by_prompt(self) -> list[dict[str, list]]:
        """[P] rows ``{"responses": [k texts], <score>: [k floats], ...}``, e.g. for a generations file."""
        scores = {name: self.per_prompt(name).tolist() for name in self.scores}
        return [{"responses": group, **{name: values[i] for name, values in scores.items()}} for i, group in enumerate(self.groups())]


class SampleMetric(Metric):
    """A metric updated with an evaluation batch's ``Samples``; states sum or concatenate under DDP."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def accumulate(self, values: Tensor) -> None:
        self.total += values.double().sum().to(self.total.device)
        self.count += values.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class MeanScore(SampleMetric):
    """Mean of a per-sample score; with ``drop_at_or_above``, samples scoring that much or more (or NaN) are left out."""

    def __init__(self, score: str, drop_at_or_above: Optional[float] = None, **kwargs):
        super().__init__(**kwargs)
        self.score, self.drop_at_or_above = score, drop_at_or_above

    def update(self, samples: Samples) -> None:
        values = samples.scores[self.score]
        if self.drop_at_or_above is not None:
            values = values[values < self.drop_at_or_above]  # NaN compares False: dropped too
        self.accumulate(values)


class ShareOfSamplesAbove(SampleMetric):
    """Share of samples scoring above ``threshold`` (e.g. the safe-response rate)."""

    def __init__(self, score: str, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.score, self.threshold = score, threshold

    def update(self, samples: Samples) -> None:
        self.accumulate((samples.scores[self.score] > self.threshold).float())


class MeanOfMax(SampleMetric):
    """Mean over prompts of the highest score among each prompt's samples (e.g. average max toxicity)."""

    def __init__(self, score: str, **kwargs):
        super().__init__(**kwargs)
        self.score = score

    def update(self, samples: Samples) -> None:
        self.accumulate(samples.per_prompt(self.score).amax(-1))


class ShareOfPromptsAbove(SampleMetric):
    """Share of prompts with at least one sample scoring above ``threshold`` (e.g. toxicity probability)."""

    def __init__(self, score: str, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.score, self.threshold = score, threshold

    def update(self, samples: Samples) -> None:
        self.accumulate((samples.per_prompt(self.score) > self.threshold).any(-1).float())


class DistinctN(SampleMetric):
    """distinct-n per prompt: distinct n-grams over n-grams of its k samples together, averaged over prompts.

    With one sample per prompt this is per-generation repetition (1 = none); with k it is also
    the diversity among a prompt's samples, as reported for toxicity (DExperts, Quark).
    """

    def __init__(self, n: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def update(self, samples: Samples) -> None:
        ratios = []
        for group in samples.groups():
            grams = [gram for text in group for gram in ngrams(text, self.n)]
            ratios.append(len(set(grams)) / len(grams) if grams else 0.0)
        self.accumulate(torch.tensor(ratios, dtype=torch.float64))


def with_references(samples: Samples, key: str) -> tuple[list[str], list[list[str]]]:
    """Each sample of a prompt that has references (``meta[key]``: a string or a list), with those references."""
    k = samples.samples_per_prompt
    pairs = [
        (samples.responses[i * k + j], [refs] if isinstance(refs, str) else list(refs))
        for i, meta in enumerate(samples.meta) if (refs := meta.get(key))
        for j in range(k)
    ]
    return [p for p, _ in pairs], [r for _, r in pairs]


class BLEU(BLEUScore):
    """Corpus BLEU of the samples against their prompt's references (``meta["references"]``); prompts without any are skipped."""

    def __init__(self, n_gram: int = 4, references: str = "references", **kwargs):
        super().__init__(n_gram=n_gram, **kwargs)
        self.references = references

    def update(self, samples: Samples) -> None:
        predictions, references = with_references(samples, self.references)
        if predictions:
            super().update(predictions, references)

    def compute(self) -> Tensor:
        return super().compute() if self.preds_len > 0 else torch.tensor(float("nan"))  # no references seen: undefined, as ROUGE


class ROUGE(ROUGEScore):
    """ROUGE F-measure (``rouge1``, ``rouge2``, ``rougeL``) against the prompt's references (best reference per sample)."""

    def __init__(self, key: Literal["rouge1", "rouge2", "rougeL"] = "rougeL", references: str = "references", **kwargs):
        super().__init__(rouge_keys=(key,), **kwargs)  # no rougeLsum: it wants NLTK data
        self.key, self.references = key, references

    def update(self, samples: Samples) -> None:
        predictions, references = with_references(samples, self.references)
        if predictions:
            super().update(predictions, references)

    def compute(self) -> Tensor:
        return super().compute()[f"{self.key}_fmeasure"]

    # ROUGEScore hashes its states alone, and a Metric's == is truthy: fresh instances would collide as
    # modules (nn.Module keeps one of them, and Lightning cannot find the others to log them).
    __hash__ = Metric.__hash__


class CorpusDistinctN(Metric):
    """Corpus distinct-n (Li et al. 2016): distinct n-grams of all generations over their n-grams.

    Low when generations share phrasing across prompts, e.g. one template with the prompt's
    words filled in, which per-prompt distinct-n cannot see. N-grams are kept as stable
    64-bit hashes, so ranks agree under DDP.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, n: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.n = n
        self.add_state("hashes", [], dist_reduce_fx="cat")

    def update(self, samples: Samples) -> None:
        grams = [" ".join(gram) for text in samples.responses for gram in ngrams(text, self.n)]
        self.hashes.append(torch.tensor([stable_hash(g) for g in grams], dtype=torch.long, device=self.device))

    def compute(self) -> Tensor:
        if isinstance(self.hashes, list) and not self.hashes:  # never updated (after a DDP sync: one tensor)
            return torch.tensor(0.0)
        hashes = dim_zero_cat(self.hashes)
        return torch.tensor(hashes.unique().numel() / max(hashes.numel(), 1))


def stable_hash(text: str) -> int:
    """A signed 64-bit hash of ``text`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
