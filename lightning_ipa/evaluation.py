"""What validation and test measure, and the frozen models that evaluation alone needs."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from .bases import BaseDType, load_causal_lm, load_tokenizer, resolve_pretrained
from .metrics import CorpusDistinctN, DistinctN, MeanScore

Stage = Literal["val", "test"]


class Evaluation(nn.Module):
    """Samples k responses per prompt from the base alone and the tailored policy and measures both.

    Each sample is scored by the reward (``reward`` and its parts) and by ``score`` (scores only
    evaluation needs, e.g. fluency under an evaluation LM); ``metrics`` aggregate those scores.
    This default logs the mean reward and its parts, distinct-2 and corpus distinct-2; a task
    subclasses it for its protocol. Its models are frozen, move with the module and are never
    checkpointed.
    """

    def __init__(self, samples_per_prompt: int = 1, val_samples_per_prompt: int = 1):
        """
        Args:
            samples_per_prompt: Samples per prompt and policy in ``test``.
            val_samples_per_prompt: Samples per prompt and policy in validation (during ``fit`` and ``validate``).
        """
        super().__init__()
        if samples_per_prompt < 1 or val_samples_per_prompt < 1:
            raise ValueError(f"samples per prompt must be ≥ 1, got test {samples_per_prompt}, val {val_samples_per_prompt}")
        self.samples_per_prompt = samples_per_prompt
        self.val_samples_per_prompt = val_samples_per_prompt

    def num_samples(self, stage: Stage) -> int:
        return self.samples_per_prompt if stage == "test" else self.val_samples_per_prompt

    def metrics(self, reward_names: Sequence[str]) -> dict[str, Metric]:
        """Fresh metrics by log name (logged as ``<stage>/<name>/<policy>``)."""
        means = {name: MeanScore(name) for name in ("reward", *reward_names)}
        return {**means, "distinct_2": DistinctN(2), "corpus_distinct_2": CorpusDistinctN(2)}

    def score(self, prompts: list[str], responses: list[str]) -> dict[str, Tensor]:
        """Per-sample scores [N] by name beside the reward's, for aligned prompt/response lists of N."""
        return {}

    def train(self, mode: bool = True) -> "Evaluation":
        return super().train(False)  # frozen models: dropout stays off


class Perplexity(nn.Module):
    """Perplexity of each continuation given its prompt under a frozen evaluation LM (fluency).

    The LM reads its own tokenisation of the texts (BOS, prompt, continuation) and scores the
    continuation's tokens only; a continuation with no token scores NaN.
    """

    def __init__(self, name_or_path: str, dtype: BaseDType = "auto", batch_size: int = 32):
        """
        Args:
            name_or_path: Evaluation LM: hub name (GPT-2 XL, ``gpt2-xl``, in the literature), folder or ``.gguf``.
            dtype: Weights' dtype; 'auto': bfloat16 where the hardware runs it natively, else float32.
            batch_size: Texts per forward pass.
        """
        super().__init__()
        path = resolve_pretrained(name_or_path)
        self.tokenizer = load_tokenizer(path)
        self.lm = load_causal_lm(path, dtype).requires_grad_(False).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def forward(self, prompts: list[str], continuations: list[str]) -> Tensor:
        """[N] perplexities (float32, on the LM's device) of ``continuations`` after ``prompts``."""
        return torch.cat([
            self._batch(prompts[i : i + self.batch_size], continuations[i : i + self.batch_size])
            for i in range(0, len(prompts), self.batch_size)
        ])

    def _batch(self, prompts: list[str], continuations: list[str]) -> Tensor:
        encode = lambda texts: self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
        bos = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        rows = [(bos + p, c) for p, c in zip(encode(prompts), encode(continuations))]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)  # [N, L] continuation tokens with a context before them
        for i, (p, c) in enumerate(rows):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            scored[i, max(len(p), 1) : len(p) + len(c)] = True
        ids, mask, scored = (x.to(self.lm.device) for x in (ids, mask, scored))
        logits = self.lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [N, L-1]
        scored = scored[:, 1:]
        return (nll * scored).sum(-1).div(scored.sum(-1)).exp()  # 0/0 = NaN: nothing to score
