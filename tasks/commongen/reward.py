"""CommonGen's own reward part: concept coverage, in any or in the listed order.

IPA's reward is coverage × fluency: compose it with a fluency (``ClassifierReward`` on CoLA, or offline
``PerplexityFluency(context=None)``) through ``ComposedReward(combine="product")``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ipa.metrics import words
from lightning_ipa.rewards import Reward
from tasks.quickstart.reward import coverage, lemmas


def ordered_coverage(concepts: list[str], text: str) -> float:
    """Share of the concepts that the response uses in the listed order, as IPA scores it.

    The concepts are taken in the order of their first use in ``text`` (matched by lemma); the score
    is the length of the prefix that agrees with the listed order, over the number of concepts.
    """
    concept_lemmas = [lemmas(c.lower()) for c in concepts]
    used: list[int] = []
    for word in words(text):
        used += [i for i, forms in enumerate(concept_lemmas) if i not in used and forms & lemmas(word)]
    in_order = 0
    while in_order < len(used) and used[in_order] == in_order:
        in_order += 1
    return in_order / len(concepts)


class Coverage(Reward):
    """reward = share of the prompt's concepts (``meta["concepts"]``) used in the response, matched by lemma.

    ``ordered``: only the concepts used in the listed order count (IPA's coverage for its ordered prompt).
    """

    def __init__(self, ordered: bool = False):
        """
        Args:
            ordered: Count the longest prefix of the listed concepts that the response uses in that order
                (IPA's ordered coverage); False: every concept used, in any order.
        """
        self.ordered = ordered

    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        score = ordered_coverage if self.ordered else coverage
        return {"reward": torch.tensor([score(m["concepts"], r) for m, r in zip(meta, responses)], dtype=torch.float32)}

