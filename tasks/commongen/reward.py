"""CommonGen's own reward part: concept coverage, in any or in the listed order, as IPA computes it.

IPA's reward is coverage × fluency: compose it with a fluency (``ClassifierReward`` on CoLA, or offline
``PerplexityFluency(context=None)``) through ``ComposedReward(combine="product")``.

Reference: GXimingLu/IPA ``reward.py``, ``Reward._compute_coverage`` (its default, ``use_binary=False``, is the
ordered coverage). Matching (``tasks.concepts``, ``Matching``): ``"ipa"`` by default — whitespace tokens,
attached punctuation split off, one lemma per piece (spaCy there, lemminflect standing in here), case kept;
``"lenient"`` is our earlier, more generous convention (lower-cased words, any lemma), which scores higher.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ipa.metrics import words
from lightning_ipa.rewards import Reward
from tasks.concepts import Matching, coverage, ipa_concept_lemma, ipa_lemmas, lemmas


def ordered_coverage(concepts: list[str], text: str, matching: Matching = "ipa") -> float:
    """Share of the concepts that the response uses in the listed order, as IPA's ``_compute_coverage`` scores it.

    ``"ipa"``: the distinct concept lemmas in the order of their first use among the response's lemmas are compared
    with the concepts' lemmas in the listed order; the score is the length of the prefix that agrees, over the
    number of concepts (two concepts with the same lemma count once in the response: ``["ski", "skis"]`` scores at
    most 1/2). ``"lenient"``: the same prefix rule with each concept matched by any shared lemma of any word.
    """
    if matching == "ipa":
        concept_lemmas = [ipa_concept_lemma(c) for c in concepts]
        keywords: list[str] = []
        for lemma in ipa_lemmas(text):
            if lemma in concept_lemmas and lemma not in keywords:
                keywords.append(lemma)
        in_order = 0
        while in_order < len(keywords) and keywords[in_order] == concept_lemmas[in_order]:
            in_order += 1
        return in_order / len(concepts)
    if matching != "lenient":
        raise ValueError(f"matching must be 'ipa' or 'lenient', got {matching!r}")
    forms = [lemmas(c.lower()) for c in concepts]
    used: list[int] = []
    for word in words(text):
        used += [i for i, concept_forms in enumerate(forms) if i not in used and concept_forms & lemmas(word)]
    in_order = 0
    while in_order < len(used) and used[in_order] == in_order:
        in_order += 1
    return in_order / len(concepts)


class Coverage(Reward):
    """reward = share of the prompt's concepts (``meta["concepts"]``) used in the response, as IPA matches them.

    ``ordered``: IPA's coverage (``reward.py``, ``Reward._compute_coverage``): the longest prefix of the listed
    concepts that the response uses in that order. Unordered: the concepts used anywhere (IPA counts them in its
    ``use_binary`` branch), over the number of concepts. ``matching``: see ``tasks.concepts``.
    """

    def __init__(self, ordered: bool = False, matching: Matching = "ipa"):
        """
        Args:
            ordered: Count the longest prefix of the listed concepts that the response uses in that order
                (IPA's ordered coverage); False: every concept used, in any order.
            matching: 'ipa': IPA's matching (whitespace tokens, punctuation split off, one lemma per token, case
                kept; lemminflect for spaCy); 'lenient': lower-cased words sharing any lemma (scores higher).
        """
        if matching not in ("ipa", "lenient"):
            raise ValueError(f"matching must be 'ipa' or 'lenient', got {matching!r}")
        self.ordered = ordered
        self.matching = matching

    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        score = ordered_coverage if self.ordered else coverage
        scores = [score(m["concepts"], r, matching=self.matching) for m, r in zip(meta, responses)]
        return {"reward": torch.tensor(scores, dtype=torch.float32)}
