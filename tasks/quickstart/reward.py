"""Reward: share of the given words used × a no-repetition term; and the two ways of matching a concept word.

Matching conventions (``Matching``), shared with CommonGen (``tasks.commongen.reward``):

- ``"ipa"``: as IPA's reward scores CommonGen (GXimingLu/IPA ``reward.py``, ``Reward._compute_coverage``): the
  response is split on whitespace, each token goes through spaCy alone (``nlp(token)``), which splits off
  attached punctuation and clitics and gives each piece **one** lemma (lower-cased, except a proper noun's, which
  keeps its case); a concept's lemma is that of its first piece; lemmas match as strings, case kept. We have no
  spaCy model at run time, so lemminflect stands in for spaCy's tagger + lemmatiser (``ipa_tokens``, ``ipa_lemma``
  say how). Measured against spaCy 3.8 with en_core_web_sm 3.8.0 on 481 CommonGen-style sentences, IPA's ordered
  coverage agreed on 96% of them; the rest are spaCy's tagging of lone tokens (a capitalised common noun taken
  for a proper noun or not, "shovels" taken for a proper noun) and its rule lemmatiser's slips ("cookies" →
  "cooky", "riding" → "rid").
- ``"lenient"``: our own, more generous matching: lower-cased ``\\w+`` words, and a concept counts when it shares
  *any* lemma, under any part of speech, with some word ("Dog runs" covers dog and run; "leaves" covers leaf).
  The quickstart's reward keeps it, so its numbers stay comparable with earlier runs.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Literal

import torch
from lemminflect import getAllLemmas, getAllLemmasOOV
from torch import Tensor

from lightning_ipa.metrics import distinct_ratio, words
from lightning_ipa.rewards import Reward

Matching = Literal["ipa", "lenient"]

# ---- lenient matching (ours) ----


@lru_cache(maxsize=65536)
def lemmas(word: str) -> frozenset[str]:
    """The word and all its lemmas under any part of speech (``ran`` → {ran, run}): the lenient matching."""
    return frozenset({word, *(lemma for forms in getAllLemmas(word).values() for lemma in forms)})


# ---- IPA's matching (spaCy's tokenizer and lemmatiser, one whitespace token at a time) ----

# spaCy's English punctuation rules, simplified: what it splits off the start or end of a whitespace token, and
# what it splits inside one (a hyphen, dash or slash between letters; an ellipsis).
_PREFIX = re.compile(r"""(?:\.\.+|…|[\"'`(\[{<«“‘”’¿¡$£€#*~&§=+])""")
_SUFFIX = re.compile(r"""(?:\.\.+|…|[.,!?;:)\]}>"'`»”’%*]|['’](?:[sSmMdD]|ll|LL|re|RE|ve|VE)|[nN]['’][tT])$""")
_INFIX = re.compile(r"(?<=[^\W_])([-–—/]+|\.\.+|…)(?=[^\W\d_])")


def ipa_tokens(text: str) -> list[str]:
    """The pieces spaCy makes of each whitespace token of ``text`` (IPA runs spaCy on one whitespace token at a time).

    Leading punctuation (quotes, brackets, …) and trailing punctuation and clitics (``.``, ``,``, ``"``, ``'s``,
    ``n't``, …) split off; a hyphen, dash or slash between letters splits the word (``sand-castle`` → sand, -, castle).
    """
    pieces = []
    for token in text.split():
        head, tail = [], []
        while len(token) > 1 and (match := _PREFIX.match(token)):
            head.append(match.group())
            token = token[match.end() :]
        while (match := _SUFFIX.search(token)) and match.start() > 0:
            tail.insert(0, match.group())
            token = token[: match.start()]
        pieces += head + [piece for piece in _INFIX.split(token) if piece] + tail
    return pieces


def _lemma(word: str) -> str:
    """One lemma of a lower-cased word: lemminflect's verb reading first, then noun, adjective, adverb (the order
    that agrees best with spaCy's tags of lone tokens: ``leaves`` → leave, ``saw`` → see); its suffix rules when the
    word is unknown (``frisbees`` → frisbee), as spaCy's rule lemmatiser falls back on its suffix rules."""
    found = getAllLemmas(word)
    for pos in ("VERB", "NOUN", "ADJ", "ADV", *found):
        if pos in found:
            return found[pos][0]
    return getAllLemmasOOV(word, "NOUN").get("NOUN", (word,))[0]


@lru_cache(maxsize=65536)
def ipa_lemma(token: str) -> str:
    """The one lemma IPA's spaCy gives a piece of a response, with lemminflect standing in for spaCy.

    spaCy lower-cases lemmas, except a proper noun's, which it keeps as written; alone, a capitalised inflected form
    is a common noun or verb to it (``Dogs`` → dog, ``Ran`` → run) and a capitalised base form often a proper noun
    (``Dog`` → Dog), which is what we do (spaCy is not consistent there: ``Frisbee`` → frisbee). Punctuation and
    clitics are kept as written.
    """
    if not token[:1].isalnum():
        return token
    lower = token.lower()
    lemma = _lemma(lower)
    return token if token != lower and lemma == lower else lemma


def ipa_lemmas(text: str) -> list[str]:
    """IPA's ``lemmatized_output``: one lemma per piece of each whitespace token, in order."""
    return [ipa_lemma(piece) for piece in ipa_tokens(text)]


def ipa_concept_lemma(concept: str) -> str:
    """IPA's lemma of a concept: ``nlp(concept.strip())[0].lemma_``, the lemma of its first piece."""
    pieces = ipa_tokens(concept)
    return ipa_lemma(pieces[0]) if pieces else ""


def coverage(concepts: list[str], text: str, matching: Matching = "lenient") -> float:
    """Share of ``concepts`` that ``text`` uses, in any order.

    ``matching="ipa"``: the concepts whose lemma is among the text's lemmas (IPA's ``_compute_coverage`` counts
    them, as ``score``, in its ``use_binary`` branch), over the number of concepts. ``"lenient"``: the concepts
    that some word of ``text`` shares a lemma with (lower-cased ``\\w+`` words, any lemma).
    """
    if matching == "ipa":
        found = set(ipa_lemmas(text))
        return sum(ipa_concept_lemma(c) in found for c in concepts) / len(concepts)
    if matching == "lenient":
        found = set().union(*(lemmas(w) for w in words(text)))
        return sum(bool(lemmas(c.lower()) & found) for c in concepts) / len(concepts)
    raise ValueError(f"matching must be 'ipa' or 'lenient', got {matching!r}")


class ConceptCoverage(Reward):
    """reward = coverage × distinct-2^repetition_power − repetition_penalty × (1 − distinct-2).

    Coverage alone is hacked by word lists that repeat the concepts; the distinct-2 factor
    (distinct word bigrams / bigrams of the response) makes repetition cost reward, and the
    penalty makes it cost even in responses that cover no concept (where the factor cannot).
    Coverage is in any order with the ``"lenient"`` matching by default (the quickstart is our task, not IPA's; its
    numbers were measured so): "Dog runs" covers dog and run, where IPA's matching covers run only.
    """

    names = ("coverage", "fluency")

    def __init__(self, repetition_power: float = 1.0, repetition_penalty: float = 0.0, matching: Matching = "lenient"):
        """
        Args:
            repetition_power: Exponent of the distinct-2 factor (0: coverage alone).
            repetition_penalty: Weight of the additive (1 − distinct-2) penalty (0: off).
            matching: How a concept is matched: 'lenient' (lower-cased words, any lemma) or 'ipa' (IPA's CommonGen
                reward: whitespace tokens, one lemma each, case kept).
        """
        self.repetition_power = repetition_power
        self.repetition_penalty = repetition_penalty
        self.matching = matching

    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        cov = torch.tensor([coverage(m["concepts"], r, matching=self.matching) for m, r in zip(meta, responses)])
        distinct = torch.tensor([distinct_ratio(r, 2) for r in responses])
        fluency = distinct**self.repetition_power
        return {"reward": cov * fluency - self.repetition_penalty * (1 - distinct), "coverage": cov, "fluency": fluency}
