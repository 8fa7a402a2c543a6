"""What knowledge-grounded dialogue evaluation measures: faithfulness, overlap with the gold response, diversity, reward."""

from __future__ import annotations

from typing import Sequence

from torchmetrics import Metric

from lightning_ipa.evaluation import Evaluation
from lightning_ipa.metrics import BLEU, ROUGE, DistinctN, MeanScore
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
    ):
        """
        Args:
            samples_per_prompt: Samples per prompt and policy in ``test``.
            val_samples_per_prompt: Samples per prompt and policy in validation.
            faithfulness: The reward part that scores faithfulness to the knowledge (the critic's probability).
            bleu_n_gram: Highest n-gram order of BLEU.
            distinct: The n of distinct-n.
        """
        super().__init__(samples_per_prompt, val_samples_per_prompt)
        self.faithfulness = faithfulness
        self.bleu_n_gram = bleu_n_gram
        self.distinct = tuple(distinct)

    def metrics(self, reward_names: Sequence[str]) -> dict[str, Metric]:
        require_scores(type(self).__name__, {"faithfulness": self.faithfulness}, reward_names)
        return {
            "faithfulness": MeanScore(self.faithfulness),
            "bleu": BLEU(self.bleu_n_gram),
            **{key: ROUGE(key) for key in ("rouge1", "rouge2", "rougeL")},
            **{f"distinct_{n}": DistinctN(n) for n in self.distinct},
            "reward": MeanScore("reward"),
        }
