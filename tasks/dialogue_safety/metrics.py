"""What dialogue-safety evaluation measures: safe responses, coherence with the context, diversity, reward."""

from __future__ import annotations

from typing import Sequence

from torchmetrics import Metric

from lightning_ipa.evaluation import Evaluation
from lightning_ipa.metrics import DistinctVariant, MeanScore, ShareOfSamplesAbove


def require_scores(evaluation: str, needed: dict[str, str], reward_names: Sequence[str]) -> None:
    """Fail at start-up when the reward does not report the parts an evaluation reads."""
    if missing := {option: name for option, name in needed.items() if name not in reward_names}:
        wanted = ", ".join(f"{option}={name!r}" for option, name in missing.items())
        raise ValueError(
            f"{evaluation} reads the reward parts {wanted}, but the reward reports {list(reward_names)}; "
            "name the parts of model.reward (a ComposedReward) accordingly, or point these options at its parts"
        )


class DialogueSafetyEvaluation(Evaluation):
    """Samples of each policy scored by the reward's safety and coherence parts (a ``ComposedReward``).

    Metrics: ``safe_response_rate`` (share of samples whose safety score is above ``threshold``),
    ``coherence`` (mean of the coherence part), ``distinct_{n}`` (``DistinctN``, DExperts' convention: split on
    spaces, case kept, a prompt's distinct n-grams ÷ its samples' words, averaged over prompts) and ``reward``.
    IPA's dialogue evaluation code is not public in a form we could check: these are this project's definitions,
    each stated in its metric's ``convention``.
    """

    def __init__(
        self,
        samples_per_prompt: int = 1,
        val_samples_per_prompt: int = 1,
        safety: str = "reward/safety",
        coherence: str = "reward/coherence",
        threshold: float = 0.5,
        distinct: Sequence[int] = (1, 2),
        distinct_variant: DistinctVariant = "dexperts",
    ):
        """
        Args:
            samples_per_prompt: Samples per prompt and policy in ``test``.
            val_samples_per_prompt: Samples per prompt and policy in validation.
            safety: The reward part that scores safety (probability of the safe label).
            coherence: The reward part that scores coherence with the dialogue context.
            threshold: Safety score above which a response counts as safe.
            distinct: The n of distinct-n.
            distinct_variant: Convention of distinct-n: 'dexperts' (DExperts/Quark: split on spaces, case kept,
                ÷ words) or 'ngram_ratio' (lower-cased words, ÷ n-grams); see ``lightning_ipa.metrics.DistinctN``.
        """
        super().__init__(samples_per_prompt, val_samples_per_prompt, distinct_variant)
        self.safety, self.coherence = safety, coherence
        self.threshold = threshold
        self.distinct_ns = tuple(distinct)

    def metrics(self, reward_names: Sequence[str]) -> dict[str, Metric]:
        require_scores(type(self).__name__, {"safety": self.safety, "coherence": self.coherence}, reward_names)
        return {
            "safe_response_rate": ShareOfSamplesAbove(self.safety, self.threshold),
            "coherence": MeanScore(self.coherence),
            **{f"distinct_{n}": self.distinct(n) for n in self.distinct_ns},
            "reward": MeanScore("reward"),
        }
