"""Concepts: the word lists concept sets are drawn from, and how a sentence is matched against a concept.

Shared by the quickstart (``tasks.quickstart``: our small offline concept-to-sentence task) and CommonGen
(``tasks.commongen``: the paper's lexically constrained task), so that neither depends on the other.

Matching conventions (``Matching``):

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

import math
import random
import re
from functools import lru_cache
from typing import Literal

from lemminflect import getAllLemmas, getAllLemmasOOV

from lightning_ipa.metrics import words

# ---- the word lists ----

NOUNS = """
apple baby ball beach bed bell bicycle bird boat book bottle box bread bridge brush bus cake
camera candle car carpet cat chair cheese child clock cloud coat coffee computer cookie cow cup
desk doctor dog door dress drum egg engine farmer fence field fish flag flower forest fork fox
garden gate girl glass goat guitar hammer hat horse house island jacket key kitchen knife ladder
lake lamp leaf letter lion map market mirror monkey moon mountain mouse nest newspaper ocean
orange painter pencil phone piano picture pillow plate pocket pool potato rabbit rain river road
rock roof rope sand sheep ship shoe singer snow soup spoon star stone street student sun table
teacher tent ticket tiger towel tower train tree truck umbrella village violin wall watch water
wheel window wolf
""".split()

VERBS = """
bake build carry catch chase clean climb cook cut dance dig drink drive drop eat fill find fix fly
fold hang hide hold jump kick kiss knock laugh lift listen open paint pick play pour pull push read
ride run sail sell sew shake sing sit sleep smell splash stand swim throw wash watch wave write
""".split()


def concept_sets(n: int, size: int, rng: random.Random) -> list[tuple[str, ...]]:
    """n distinct sets of ``size`` words: one verb and size−1 nouns, in random order.

    Raises:
        ValueError: ``size`` < 1, or more sets asked for than the word lists hold (the draw would never end).
    """
    verbs, nouns = set(VERBS), set(NOUNS)  # a word may be both ("watch")
    possible = 0  # sets with a verb that is no noun, and sets of nouns only, one of them a verb too
    if size >= 1:
        possible = len(verbs - nouns) * math.comb(len(nouns), size - 1) + math.comb(len(nouns), size) - math.comb(len(nouns - verbs), size)
    if n > possible:
        raise ValueError(
            f"{n} concept sets of {size} word{'s' * (size != 1)} asked for (train_size + val_size), but the word lists hold only "
            f"{possible} distinct sets of one verb and {size - 1} noun{'s' * (size != 2)}: lower train_size or val_size, or raise "
            f"concepts_per_prompt (≥ 2)"
        )
    sets: set[tuple[str, ...]] = set()
    while len(sets) < n:
        drawn = [rng.choice(VERBS), *rng.sample(NOUNS, size - 1)]
        if len(set(drawn)) == size:
            sets.add(tuple(sorted(drawn)))
    return [tuple(rng.sample(s, size)) for s in sorted(sets)]


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
