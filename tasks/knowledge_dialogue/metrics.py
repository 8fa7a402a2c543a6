"""What knowledge-grounded dialogue evaluation measures: faithfulness, overlap with the gold response, diversity, reward."""

from __future__ import annotations

from typing import Sequence

from torchmetrics import Metric

from lightning_ipa.evaluation import Evaluation
from lightning_ipa.metrics import BLEU, ROUGE, DistinctVariant, MeanScore
from tasks.dialogue_safety.metrics import require_scores


class KnowledgeDialogueEvaluation(Evaluation):
    """Samples of each policy scored by the reward's faithfulness part and against the gold response.

    Metrics: ``faithfulness`` (mean of the faithfulness critic's part), ``bleu`` (``BLEU``: sacreBLEU's corpus
    BLEU-4, 13a tokens, case kept, exp smoothing), ``rouge1``, ``rouge2``, ``rougeL`` (``ROUGE``: rouge-score's F-measure,
    no stemmer) against ``meta["references"]``, ``distinct_{n}`` (``DistinctN``, DExperts' convention: distinct
    n-grams ÷ words of each prompt's samples, averaged over prompts) and ``reward``.
    """

    def __init__(
        self,
        samples_per_prompt: int = 1,
        val_samples_per_prompt: int = 1,
        faithfulness: str = "reward/faithfulness",
        bleu_n_gram: int = 4,
        distinct: Sequence[int] = (1, 2),
        distinct_variant: DistinctVariant = "dexperts",
        rouge_stemmer: bool = False,
    ):
        """
        Args:
            samples_per_prompt: Samples per prompt and policy in ``test``.
            val_samples_per_prompt: Samples per prompt and policy in validation.
            faithfulness: The reward part that scores faithfulness to the knowledge (the critic's probability).
            bleu_n_gram: Highest n-gram order of BLEU.
            distinct: The n of distinct-n.
            distinct_variant: Convention of distinct-n: 'dexperts' (DExperts/Quark: split on spaces, case kept,
                ÷ words) or 'ngram_ratio' (lower-cased words, ÷ n-grams); see ``lightning_ipa.metrics.DistinctN``.
            rouge_stemmer: Porter-stem words longer than 3 characters in ROUGE (rouge-score's ``use_stemmer``; its default: no).
        """
        super().__init__(samples_per_prompt, val_samples_per_prompt, distinct_variant)
        self.faithfulness = faithfulness
        self.bleu_n_gram = bleu_n_gram
        self.distinct_ns = tuple(distinct)
        self.rouge_stemmer = rouge_stemmer

    def metrics(self, reward_names: Sequence[str]) -> dict[str, Metric]:
        require_scores(type(self).__name__, {"faithfulness": self.faithfulness}, reward_names)
        return {
            "faithfulness": MeanScore(self.faithfulness),
            "bleu": BLEU(self.bleu_n_gram),
            **{key: ROUGE(key, use_stemmer=self.rouge_stemmer) for key in ("rouge1", "rouge2", "rougeL")},
            **{f"distinct_{n}": self.distinct(n) for n in self.distinct_ns},
            "reward": MeanScore("reward"),
        }
