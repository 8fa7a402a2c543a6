"""The CommonGen evaluation of IPA: coverage, fluency and overlap with the reference sentences."""

from __future__ import annotations

from typing import Sequence

from torchmetrics import Metric

from lightning_ipa.evaluation import Evaluation
from lightning_ipa.metrics import BLEU, ROUGE, MeanScore, ShareOfSamplesAbove


class CommonGenEvaluation(Evaluation):
    """k samples per prompt (1 in IPA), scored by the reward's coverage and fluency parts and against the references.

    Metrics: ``coverage`` (mean share of concepts used), ``binary_coverage`` (share of samples using them
    all), ``fluency`` (mean of the reward's fluency part, e.g. CoLA acceptability), ``bleu`` (``BLEU``: sacreBLEU's
    corpus BLEU-4, 13a tokens, case kept, exp smoothing), ``rouge1``, ``rouge2``, ``rougeL`` (``ROUGE``: rouge-score's
    F-measure against the best reference, no stemmer; sets without references are left out of these four) and
    ``reward``. CommonGen's leaderboard and the IPA paper's BLEU-4 come from CommonGen's ``eval_metrics/eval.py``
    (pycocoevalcap over spaCy tokens), not sacreBLEU: compare our BLEU between runs here, not with those tables.
    """

    def __init__(
        self,
        samples_per_prompt: int = 1,
        val_samples_per_prompt: int = 1,
        coverage: str = "reward/coverage",
        fluency: str = "reward/fluency",
        rouge_stemmer: bool = False,
    ):
        """
        Args:
            samples_per_prompt: Samples per prompt and policy in ``test``.
            val_samples_per_prompt: Samples per prompt and policy in validation.
            coverage: The reward's score holding coverage (a ``ComposedReward`` part named 'coverage' reports 'reward/coverage').
            fluency: The reward's score holding fluency (a part named 'fluency' reports 'reward/fluency').
            rouge_stemmer: Porter-stem words longer than 3 characters in ROUGE (rouge-score's ``use_stemmer``; its default: no).
        """
        super().__init__(samples_per_prompt, val_samples_per_prompt)
        self.coverage = coverage
        self.fluency = fluency
        self.rouge_stemmer = rouge_stemmer

    def metrics(self, reward_names: Sequence[str]) -> dict[str, Metric]:
        if missing := [name for name in (self.coverage, self.fluency) if name not in reward_names]:
            raise ValueError(
                f"CommonGenEvaluation reads {missing} from the reward, which reports {list(reward_names)}: compose it as "
                "ComposedReward(rewards={coverage: Coverage, fluency: ...}, combine=product), or set model.evaluation's "
                "coverage/fluency to the scores that hold them"
            )
        return {
            "coverage": MeanScore(self.coverage),
            "binary_coverage": ShareOfSamplesAbove(self.coverage, threshold=1 - 1e-6),
            "fluency": MeanScore(self.fluency),
            "bleu": BLEU(4),
            **{key: ROUGE(key, use_stemmer=self.rouge_stemmer) for key in ("rouge1", "rouge2", "rougeL")},
            "reward": MeanScore("reward"),
        }

