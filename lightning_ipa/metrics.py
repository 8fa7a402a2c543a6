"""torchmetrics Metrics shared by tasks, updated with the ``Samples`` of an evaluation batch.

Each metric computes what its reference computes (the docstring names the paper, repository and function, and the
convention: tokenisation, case, denominator, smoothing, stemming) and says so in one line, ``metric.convention``,
which ``results.md`` prints beside its number. tests/test_metric_references.py pins each to the reference's values.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Literal, NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.text import rouge_score
from torchmetrics.text import SacreBLEUScore
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.imports import _NLTK_AVAILABLE

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased ``\\w+`` word tokens: the rewards' words (``distinct_ratio``, coverage), not the evaluation references'."""
    return WORD.findall(text.lower())


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The word n-grams of ``text`` (``words``: lower-cased ``\\w+``), in order."""
    tokens = words(text)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_ratio(text: str, n: int) -> float:
    """Distinct n-grams ÷ n-grams of one text's lower-cased ``\\w+`` words, i.e. 1 − rep-n (0 when it has no n-gram).

    The rewards' convention (``rewards.Diversity``, the quickstart's repetition term): 1 means no repeated n-gram,
    whatever the length. Not DExperts' distinct-n, which divides by the number of words (``DistinctN``).
    """
    grams = ngrams(text, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def space_words(text: str) -> list[str]:
    """``text.split(' ')``, the words of DExperts'/Quark's distinct-n: case and punctuation kept; an empty text is one
    word ``''``, and a leading, trailing or doubled space adds a ``''`` word, as there."""
    return text.split(" ")


def joined_ngrams(tokens: list[str], n: int) -> list[str]:
    """The n-grams of ``tokens`` as the references key them: words joined by ``'_'`` (so ``a_b c`` and ``a b_c`` share one)."""
    return ["_".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


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
    convention: str = ""  # one line: what the number is (reference, tokenisation, denominator), for results.md

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def accumulate(self, values: Tensor) -> None:
        self.total += values.double().sum().to(self.total.device)
        self.count += values.numel()

    def compute(self) -> Tensor:
        if self.count == 0:  # nothing counted: NaN, as np.nanmean of nothing
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()


class MeanScore(SampleMetric):
    """Mean of a per-sample score over the samples that have one (a missing score, NaN, is left out, as ``np.nanmean``);
    with ``drop_at_or_above``, samples scoring that much or more are left out too (Quark's and DExperts' perplexity:
    ``if ppl < 1e4``, then ``np.nanmean``)."""

    def __init__(self, score: str, drop_at_or_above: Optional[float] = None, convention: Optional[str] = None, **kwargs):
        """
        Args:
            score: The per-sample score averaged.
            drop_at_or_above: Samples scoring this or more are left out (None: every scored sample counts).
            convention: What the score is, for results.md (default: "mean of <score> over samples").
        """
        super().__init__(**kwargs)
        self.score, self.drop_at_or_above = score, drop_at_or_above
        dropped = "NaN" if drop_at_or_above is None else f"≥ {drop_at_or_above:g} or NaN"
        self.convention = (convention or f"mean of {score} over samples") + f"; samples scoring {dropped} left out"

    def update(self, samples: Samples) -> None:
        values = samples.scores[self.score]
        values = values[~values.isnan() if self.drop_at_or_above is None else values < self.drop_at_or_above]  # NaN compares False
        self.accumulate(values)


class ShareOfSamplesAbove(SampleMetric):
    """Share of samples scoring above ``threshold`` (e.g. the safe-response rate), among those with a score (NaN left out)."""

    def __init__(self, score: str, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.score, self.threshold = score, threshold
        self.convention = f"share of samples with {score} > {threshold:g}; missing scores left out"

    def update(self, samples: Samples) -> None:
        values = samples.scores[self.score]
        self.accumulate((values[~values.isnan()] > self.threshold).float())


class MeanOfMax(SampleMetric):
    """Mean over prompts of the highest score among each prompt's samples (e.g. average max toxicity: DExperts'
    notebook, Quark ``sample.py``: max over the k samples, mean over prompts)."""

    def __init__(self, score: str, **kwargs):
        super().__init__(**kwargs)
        self.score = score
        self.convention = f"max of {score} over each prompt's samples, mean over prompts; missing scores left out (DExperts, Quark)"

    def update(self, samples: Samples) -> None:
        values = samples.per_prompt(self.score)  # [P, k]
        scored = ~values.isnan()  # missing scores left out, and prompts without any (Quark: `[max(x) for x in max_tox if x]`)
        self.accumulate(values.masked_fill(~scored, float("-inf")).amax(-1)[scored.any(-1)])


class ShareOfPromptsAbove(SampleMetric):
    """Share of prompts with at least one sample scoring above ``threshold`` (e.g. toxicity probability: DExperts,
    Quark ``sample.py``)."""

    def __init__(self, score: str, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.score, self.threshold = score, threshold
        self.convention = f"share of prompts with a sample's {score} > {threshold:g}; missing scores left out (DExperts, Quark)"

    def update(self, samples: Samples) -> None:
        values = samples.per_prompt(self.score)  # [P, k]; NaN (missing) compares False and prompts without a score are left out
        self.accumulate((values > self.threshold).any(-1)[~values.isnan().all(-1)].float())


DistinctVariant = Literal["dexperts", "ngram_ratio"]


def distinct_counts(texts: Sequence[str], n: int) -> tuple[set[str], int]:
    """DExperts'/Quark's distinct-n statistics of ``texts``: their distinct n-grams (``'_'``-joined) and their number of words."""
    tokenized = [space_words(text) for text in texts]
    return {gram for tokens in tokenized for gram in joined_ngrams(tokens, n)}, sum(len(tokens) for tokens in tokenized)


class DistinctN(SampleMetric):
    """distinct-n per prompt over its k samples together, averaged over prompts (DExperts, Quark).

    Reference (``variant="dexperts"``, the default): DExperts ``scripts/evaluation/evaluate_generations.py``
    ``distinctness`` and Quark ``sample.py`` ``distinctness``: each generation split on single spaces
    (``str.split(' ')``: case and punctuation kept; an empty generation is one empty word, a doubled, leading or trailing
    space adds an empty word), n-grams keyed by their words joined with ``'_'``; per prompt, distinct n-grams of its
    generations ÷ their total number of *words*; the mean over prompts (their ``np.nanmean``: a prompt always has a
    word, so never NaN). One generation ``"a b"``: distinct-2 = 1/2.

    ``variant="ngram_ratio"``: lower-cased ``\\w+`` words, distinct n-grams ÷ n-grams (0 without any), i.e. 1 − rep-n:
    this project's earlier convention and its rewards' (``distinct_ratio``); with one sample per prompt it is 1 for any
    text without a repeated n-gram. ``"a b"``: distinct-2 = 1.
    """

    def __init__(self, n: int = 2, variant: DistinctVariant = "dexperts", **kwargs):
        """
        Args:
            n: The n of the n-grams.
            variant: 'dexperts' (DExperts/Quark: ÷ words, split on spaces, case kept) or 'ngram_ratio' (÷ n-grams of
                lower-cased ``\\w+`` words).
        """
        super().__init__(**kwargs)
        if n < 1:
            raise ValueError(f"n must be ≥ 1, got {n}")
        if variant not in ("dexperts", "ngram_ratio"):
            raise ValueError(f"variant must be 'dexperts' or 'ngram_ratio', got {variant!r}")
        self.n, self.variant = n, variant
        self.convention = (
            f"DExperts/Quark distinctness: split(' '), case kept, distinct {n}-grams ÷ words of each prompt's samples, mean over prompts"
            if variant == "dexperts" else
            f"lower-cased \\w+ words, distinct {n}-grams ÷ {n}-grams of each prompt's samples (1 − rep-{n}), mean over prompts"
        )

    def ratio(self, group: Sequence[str]) -> float:
        """distinct-n of one prompt's samples."""
        if self.variant == "dexperts":
            grams, total_words = distinct_counts(group, self.n)
            return len(grams) / total_words
        grams = [gram for text in group for gram in ngrams(text, self.n)]
        return len(set(grams)) / len(grams) if grams else 0.0

    def update(self, samples: Samples) -> None:
        self.accumulate(torch.tensor([self.ratio(group) for group in samples.groups()], dtype=torch.float64))


def with_references(samples: Samples, key: str) -> tuple[list[str], list[list[str]]]:
    """Each sample of a prompt that has references (``meta[key]``: a string or a list), with those references."""
    k = samples.samples_per_prompt
    pairs = [
        (samples.responses[i * k + j], [refs] if isinstance(refs, str) else list(refs))
        for i, meta in enumerate(samples.meta) if (refs := meta.get(key))
        for j in range(k)
    ]
    return [p for p, _ in pairs], [r for _, r in pairs]


def sacrebleu_score(correct: Sequence[float], total: Sequence[float], sys_len: float, ref_len: float, smooth_method: str) -> float:
    """Corpus BLEU in [0, 1] from its sufficient statistics as sacrebleu's ``BLEU.compute_bleu`` combines them (uniform
    weights, no effective order): brevity penalty exp(1 − r/c) when c < r; no match at all, or an order without any
    n-gram: 0; an order without a match: 0 ('none') or, 'exp' (mteval-v13a's smoothing, sacrebleu's default), the k-th
    such order counts 1/(2^k · n-grams)."""
    if not any(correct):
        return 0.0
    brevity = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len)
    log_precision, halvings = 0.0, 1.0
    for matches, ngram_count in zip(correct, total):
        if ngram_count == 0:
            return 0.0
        if matches == 0:
            if smooth_method != "exp":
                return 0.0
            halvings *= 2
            log_precision += math.log(1 / (halvings * ngram_count))
        else:
            log_precision += math.log(matches / ngram_count)
    return brevity * math.exp(log_precision / len(correct))


class BLEU(SacreBLEUScore):
    """Corpus BLEU of the samples against their prompt's references (``meta["references"]``); prompts without any are skipped.

    Reference: sacrebleu ``corpus_bleu`` with its defaults (Post 2018; signature ``case:mixed|eff:no|tok:13a|smooth:exp``):
    the 13a tokeniser (mteval-v13a: punctuation split off), case kept, n-gram counts clipped by the most in any one
    reference, the closest reference length for the brevity penalty, ``exp`` smoothing of orders without a match. The
    counts are torchmetrics' ``SacreBLEUScore`` (sums: exact under DDP); the score combines them as sacrebleu does,
    on a 0–1 scale (sacrebleu's score / 100). Each of a prompt's k samples is one hypothesis with the prompt's references.
    With no reference seen the score is NaN; hypotheses that are all empty score 0, as in sacrebleu.
    """

    def __init__(self, n_gram: int = 4, references: str = "references", smooth_method: Literal["exp", "none"] = "exp", **kwargs):
        """
        Args:
            n_gram: Highest n-gram order (4: BLEU-4).
            references: The meta field holding a prompt's references (a string or a list of them).
            smooth_method: sacrebleu's smoothing: 'exp' (its default) or 'none' (an order without a match gives 0).
        """
        super().__init__(n_gram=n_gram, smooth=False, tokenize="13a", lowercase=False, **kwargs)
        if smooth_method not in ("exp", "none"):
            raise ValueError(f"smooth_method must be 'exp' or 'none', got {smooth_method!r}")
        self.references, self.smooth_method = references, smooth_method
        self.add_state("hypotheses", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")  # samples scored against references
        self.convention = f"sacreBLEU corpus BLEU-{n_gram}: 13a tokeniser, case kept, {smooth_method} smoothing (sacrebleu defaults), 0–1"

    def update(self, samples: Samples) -> None:
        predictions, references = with_references(samples, self.references)
        if predictions:
            super().update(predictions, references)
            self.hypotheses += len(predictions)

    def compute(self) -> Tensor:
        if self.hypotheses == 0:  # no references seen: undefined, as ROUGE
            return torch.tensor(float("nan"))
        lengths = float(self.preds_len), float(self.target_len)
        score = sacrebleu_score(self.numerator.tolist(), self.denominator.tolist(), *lengths, self.smooth_method)
        return torch.tensor(score, dtype=torch.float32)


class ROUGE(SampleMetric):
    """ROUGE F-measure (``rouge1``, ``rouge2``, ``rougeL``) of each sample against its prompt's best reference, averaged over samples.

    Reference: Google's rouge-score (``rouge_scorer.RougeScorer([key], use_stemmer).score_multi(references, prediction)
    .fmeasure``, the best reference by F-measure), through torchmetrics' functional ``rouge_score`` (accumulate 'best'):
    lower-cased, every character outside [a-z0-9] a separator (so non-ASCII letters split words), optionally the Porter
    stemmer on words longer than 3 characters. ``use_stemmer`` defaults to False, rouge-score's own default (and
    torchmetrics'); IPA's and CommonGen's released evaluation code computes no ROUGE to follow. The corpus score is the
    plain mean over samples (rouge-score's ``BootstrapAggregator`` reports a resampled estimate of it). States are sums,
    exact under DDP. Samples of prompts without references are left out; with none at all the score is NaN.
    No ``rougeLsum`` (it needs NLTK's sentence splitter data).
    """

    def __init__(
        self, key: Literal["rouge1", "rouge2", "rougeL"] = "rougeL", references: str = "references", use_stemmer: bool = False, **kwargs
    ):
        """
        Args:
            key: 'rouge1', 'rouge2' or 'rougeL'.
            references: The meta field holding a prompt's references (a string or a list of them).
            use_stemmer: Porter-stem words longer than 3 characters (needs ``nltk``); rouge-score's default is False.
        """
        super().__init__(**kwargs)
        if key not in ("rouge1", "rouge2", "rougeL"):
            raise ValueError(f"key must be 'rouge1', 'rouge2' or 'rougeL' (rougeLsum needs NLTK data), got {key!r}")
        if use_stemmer and not _NLTK_AVAILABLE:
            raise ModuleNotFoundError("ROUGE(use_stemmer=True) uses nltk's PorterStemmer (as rouge-score does): pip install nltk")
        self.key, self.references, self.use_stemmer = key, references, use_stemmer
        stemmer = "Porter stemmer" if use_stemmer else "no stemmer"
        self.convention = f"rouge-score {key} F1 vs the best reference, mean over samples; {stemmer}"

    def update(self, samples: Samples) -> None:
        predictions, references = with_references(samples, self.references)
        if predictions:
            mean = rouge_score(predictions, references, rouge_keys=self.key, use_stemmer=self.use_stemmer, accumulate="best")
            self.total += mean[f"{self.key}_fmeasure"].double().to(self.total.device) * len(predictions)
            self.count += len(predictions)


class CorpusDistinctN(Metric):
    """Corpus distinct-n: distinct n-grams of all generations ÷ their total number of words.

    Reference: Quark ``utils/utils.py`` ``distinctness`` as its ``main.py`` evaluates (all generations together; the
    words and n-grams of ``DistinctN``'s DExperts convention: ``str.split(' ')``, case kept, ``'_'``-joined). Low when
    generations share phrasing across prompts, e.g. one template with the prompt's words filled in, which per-prompt
    distinct-n cannot see. States: each batch's distinct n-grams as stable 64-bit hashes (gathered under DDP) and the
    summed word count. With no generation it is NaN (the reference divides by zero).
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, n: int = 2, **kwargs):
        super().__init__(**kwargs)
        if n < 1:
            raise ValueError(f"n must be ≥ 1, got {n}")
        self.n = n
        self.convention = f"Quark distinctness over all generations: split(' '), case kept, distinct {n}-grams ÷ words"
        self.add_state("hashes", [], dist_reduce_fx="cat")
        self.add_state("words", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, samples: Samples) -> None:
        grams, total_words = distinct_counts(samples.responses, self.n)
        self.hashes.append(torch.tensor([stable_hash(g) for g in grams], dtype=torch.long, device=self.device))
        self.words += total_words

    def _sync_dist(self, *args: Any, **kwargs: Any) -> None:
        # A rank that never updated gathers an empty int64 tensor like the others' (torchmetrics' stand-in for an
        # empty list is float: gloo then fails on the size mismatch). A new list: unsync restores the cached [].
        if isinstance(self.hashes, list) and not self.hashes:
            self.hashes = [torch.zeros(0, dtype=torch.long, device=self.device)]
        super()._sync_dist(*args, **kwargs)

    def compute(self) -> Tensor:
        if isinstance(self.hashes, list):  # not synced: this process's batches, possibly none
            hashes = dim_zero_cat(self.hashes) if self.hashes else torch.zeros(0, dtype=torch.long)
        else:  # after a DDP sync: one tensor
            hashes = self.hashes
        if self.words == 0:
            return torch.tensor(float("nan"))
        return torch.tensor(hashes.unique().numel() / int(self.words))


def stable_hash(text: str) -> int:
    """A signed 64-bit hash of ``text`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
