"""A trained adapter inside transformers' ``generate``: the tailored policy as a ``LogitsProcessor``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor

from .adapters import Adapter, ScaledHead
from .bases import scales_logits, top_k_only
from .policy import product_of_experts
from .types import position_ids

ADAPTER_FILE = "ipa_adapter.json"  # α, the policy's bans, the base's support, the control code's mode (``export.export_adapter``)
CONTROL_FILE = "ipa_control.safetensors"  # the control code the policy samples with, when the adapter has codes


class AdapterLogitsProcessor(LogitsProcessor):
    """IPA's tailored policy in any ``generate`` call of the base: ``log_softmax(scores) + α · adapter_logits``.

    The processor holds the adapter and its own KV cache: at the first step of a ``generate`` call it reads the prompts,
    then one token per step, the one the base was given, so the adapter runs once per generated token, as in
    ``TailoredPolicy``'s lockstep sampler. It applies what the policy applies before temperature
    (``policy.product_of_experts``): the base's top-k support when it was trained on one (``LocalBase(top_k)``, an API
    base), −inf for the tokens it never samples (a dedicated padding token) and for its stop tokens before
    ``min_new_tokens``. What ``generate`` does next (temperature, top-k, top-p, the draw) is transformers': with the
    exported ``generation_config`` (``from_pretrained`` reads it: the run's settings, every other sampling field neutral)
    and after ``torch.manual_seed(s)``, it draws the tokens ``TailoredPolicy.generate`` draws with
    ``torch.Generator().manual_seed(s)``; with ``alpha=0``, those of the base alone (tested, float32). Float rounding
    moves a draw only where two tokens' odds tie within it; in bfloat16, tokens of equal probability at the top-p
    boundary are common, and transformers' unstable sort orders them unlike ``truncate`` (measured: 1 draw in 6 moved).

    Left-padded prompts: pass their attention mask with ``reset(attention_mask)`` before the call (a processor sees
    token ids only). Beam search, which reorders rows between steps, is refused (the adapter's cache would not follow).

    Example::

        ipa = AdapterLogitsProcessor.from_pretrained("runs/toxicity_adapter")
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)  # padding_side="left"
        out = base.generate(**inputs, logits_processor=[ipa.reset(inputs["attention_mask"])], generation_config=ipa.generation_config)
    """

    def __init__(self, adapter: Adapter, vocab_size: int, alpha: float = 1.0, never_sampled: Sequence[int] = (),
                 stop_ids: Sequence[int] = (), min_new_tokens: int = 0, base_top_k: Optional[int] = None,
                 generation_config: Optional[GenerationConfig] = None):
        """
        Args:
            adapter: The adapter (``Adapter``: body, head, control code if any).
            vocab_size: V, the base's vocabulary.
            alpha: Its weight α in log_softmax(base) + α·adapter (0: the base alone, under the same bans; the adapter
                does not run).
            never_sampled: Token ids the policy never samples (``TailoredPolicy.never_sampled``).
            stop_ids: The tokens that end a response, banned before ``min_new_tokens`` (``TailoredPolicy.stops``).
            min_new_tokens: Stop tokens are impossible before this many new tokens (``Sampling.min_new_tokens``).
            base_top_k: The base's support was its top-k log-probs (None: the whole vocabulary).
            generation_config: The decoding settings the adapter was trained and tested with (``Sampling``), for ``generate``.
        """
        self.adapter = adapter.eval()
        self.alpha = alpha
        self.never_sampled = torch.zeros(vocab_size, dtype=torch.bool)
        self.never_sampled[list(never_sampled)] = True
        self.stops = torch.zeros(vocab_size, dtype=torch.bool)
        self.stops[list(stop_ids)] = True
        self.min_new_tokens, self.base_top_k = min_new_tokens, base_top_k
        self.generation_config = generation_config
        self.reset()

    @classmethod
    def from_pretrained(cls, path: str, dtype: Optional[torch.dtype] = None, device: Optional[str | torch.device] = None,
                        alpha: Optional[float] = None) -> "AdapterLogitsProcessor":
        """The processor of an adapter folder written by ``python -m lightning_ipa export``.

        Args:
            path: The folder (``config.json``, weights, ``ipa_adapter.json``, ``generation_config.json``).
            dtype: The adapter's dtype (None: as saved, float32).
            device: Where the adapter runs (None: CPU); the base's device, for ``generate``.
            alpha: α (None: the trained one; 0: the base alone, as the policy's evaluation draws it).

        Raises:
            FileNotFoundError: ``path`` has no ``ipa_adapter.json`` (not an exported adapter).
        """
        folder = Path(path)
        if not (folder / ADAPTER_FILE).is_file():
            raise FileNotFoundError(f"{folder} has no {ADAPTER_FILE}: not an adapter written by `python -m lightning_ipa export`")
        meta = json.loads((folder / ADAPTER_FILE).read_text())
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).requires_grad_(False).eval()
        head = lm.get_output_embeddings()
        scaled = scales_logits(lm.config)  # a 'pretrained' head of a family that scales its logits (export switched others off)
        adapter = Adapter(lm.base_model, ScaledHead(head, lm.config) if scaled else head, head.in_features)
        if meta.get("control") is not None:
            from safetensors.torch import load_file

            adapter.controls = nn.Embedding.from_pretrained(load_file(folder / CONTROL_FILE)["control"][None], freeze=True)
            adapter.control_mode = meta["control"]
        adapter.to(device or "cpu")
        return cls(adapter, meta["vocab_size"], meta["alpha"] if alpha is None else alpha, meta["never_sampled"], meta["stop_ids"],
                   meta["min_new_tokens"], meta["base_top_k"], GenerationConfig.from_pretrained(folder))

    def reset(self, attention_mask: Optional[Tensor] = None) -> "AdapterLogitsProcessor":
        """Start afresh for a new ``generate`` call; ``attention_mask`` [B, P]: the prompts' (left padding), None: unpadded.

        Returns itself, to be passed as ``logits_processor=[processor.reset(mask)]``."""
        self.prompt_mask = attention_mask
        self.cache, self.mask, self.seen, self.step, self.prompt_length = None, None, None, 0, 0
        return self

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """Scores [B, V] (float32) of the tailored policy after ``input_ids`` [B, L], from the base's ``scores`` [B, V].

        Raises:
            ValueError: an attention mask whose shape does not fit the prompts, prompts that look left-padded without
                one, or rows that changed between steps (beam search, or a new call of the same length without ``reset``).
        """
        device = self.adapter.body.device
        if self.seen is None or input_ids.shape[1] != self.seen.shape[1] + 1:  # the first step: read the prompts
            self._refuse_continuing(input_ids)
            ids, mask = input_ids.to(device), self._prompt_mask(input_ids).to(device)
            positions, self.cache, self.step, self.prompt_length = position_ids(mask), None, 0, input_ids.shape[1]
        else:
            if not torch.equal(input_ids[:, :-1], self.seen):
                raise ValueError("the rows given to AdapterLogitsProcessor changed between steps: beam search (num_beams > 1) "
                                 "reorders them, which the adapter's cache cannot follow; use sampling or greedy search, and call "
                                 "reset() before each generate call")
            ids, mask = input_ids[:, -1:].to(device), torch.cat([self.mask, self.mask.new_ones(len(input_ids), 1)], dim=1)
            positions, self.step = self.positions[:, -1:] + 1, self.step + 1
        self.seen, self.mask, self.positions = input_ids, mask, positions
        logits = None
        if self.alpha:
            hidden, self.cache = self.adapter(ids, mask, positions, self.cache, use_cache=True, control=self.adapter.sampling_control(len(ids), device))
            logits = self.adapter.head(hidden[:, -1]).to(scores.device)
        base_logprobs = top_k_only(scores.float().log_softmax(-1), self.base_top_k)
        never, stops = self.never_sampled.to(scores.device), self.stops.to(scores.device)
        early = torch.tensor(self.step < self.min_new_tokens, device=scores.device)
        return product_of_experts(base_logprobs, logits, self.alpha, never, stops, early, self.base_top_k is None)

    def _refuse_continuing(self, input_ids: Tensor) -> None:
        """Refuse rows that go on from the last call's by other than one token: several tokens per step or steps back
        (assisted generation, prompt lookup), which the adapter's cache cannot follow.

        Raises:
            ValueError: the rows extend what was seen, past the prompts' length, by other than one token."""
        if self.seen is None or len(input_ids) != len(self.seen) or input_ids.shape[1] <= self.prompt_length:
            return
        n = min(input_ids.shape[1], self.seen.shape[1])
        if torch.equal(input_ids[:, :n], self.seen[:, :n]):
            raise ValueError(f"generate gave AdapterLogitsProcessor rows of {input_ids.shape[1]} tokens after {self.seen.shape[1]}: "
                             "assisted generation or prompt lookup (several tokens a step, or steps back), which the adapter's "
                             "cache cannot follow; sample or search greedily one token a step, and call reset() before each generate call")

    def _prompt_mask(self, input_ids: Tensor) -> Tensor:
        """The prompts' attention mask [B, P]: ``reset``'s (repeated for ``num_return_sequences``), else all ones."""
        mask = self.prompt_mask
        if mask is None:
            pad = self.generation_config.pad_token_id if self.generation_config is not None else None
            first = input_ids[:, 0] == pad if pad is not None else input_ids[:, 0] < 0
            # a dedicated padding token (never sampled) starts no prompt; one borrowed from EOS may, but not only some
            if first.any() and (self.never_sampled[pad] or not first.all()):
                raise ValueError(f"prompts start with the padding token {pad}: they look left-padded; pass their attention mask "
                                 "with logits_processor=[processor.reset(inputs['attention_mask'])]")
            return torch.ones_like(input_ids)
        if mask.shape[1] != input_ids.shape[1] or len(input_ids) % len(mask):
            raise ValueError(f"reset() was given an attention mask of shape {tuple(mask.shape)}, but generate's prompts are "
                             f"{tuple(input_ids.shape)}: pass the mask of the inputs given to this generate call")
        return mask.repeat_interleave(len(input_ids) // len(mask), dim=0)  # num_return_sequences: rows repeated in place
