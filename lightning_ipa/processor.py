"""A trained adapter inside transformers' ``generate``: the tailored policy as a ``LogitsProcessor``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor

from .adapters import Adapter, ControlMode
from .types import position_ids

ADAPTER_FILE = "ipa_adapter.json"  # α, the tokens never sampled, the control code's mode (``export.export_adapter``)
CONTROL_FILE = "ipa_control.safetensors"  # the control code the policy samples with, when the adapter has codes


class AdapterLogitsProcessor(LogitsProcessor):
    """IPA's tailored policy in any ``generate`` call of the base: ``log_softmax(scores) + α · adapter_logits``.

    The processor holds the adapter and its own KV cache: at the first step of a ``generate`` call it reads the prompts,
    then one token per step, the one the base was given, so the adapter runs once per generated token, as in
    ``TailoredPolicy``'s lockstep sampler. The tokens the policy never samples (a dedicated padding token) get −inf.
    What ``generate`` does next (temperature, top-k, top-p, the draw) is transformers': with the exported
    ``generation_config`` (``from_pretrained`` reads it) and after ``torch.manual_seed(s)``, it draws the tokens that
    ``TailoredPolicy.generate`` draws with ``torch.Generator().manual_seed(s)`` (up to float rounding, which moves a
    draw only where two tokens' odds tie within it; tested).

    Left-padded prompts: pass their attention mask with ``reset(attention_mask)`` before the call (a processor sees
    token ids only). Beam search, which reorders rows between steps, is refused (the adapter's cache would not follow).

    Example::

        ipa = AdapterLogitsProcessor.from_pretrained("runs/toxicity_adapter")
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)  # padding_side="left"
        out = base.generate(**inputs, logits_processor=[ipa.reset(inputs["attention_mask"])], generation_config=ipa.generation_config)
    """

    def __init__(self, adapter: Adapter, alpha: float = 1.0, never_sampled: Sequence[int] = (),
                 generation_config: Optional[GenerationConfig] = None):
        """
        Args:
            adapter: The adapter (``Adapter``: body, head, control code if any).
            alpha: Its weight α in log_softmax(base) + α·adapter.
            never_sampled: Token ids the policy never samples (``TailoredPolicy.never_sampled``).
            generation_config: The decoding settings the adapter was trained and tested with (``Sampling``), for ``generate``.
        """
        self.adapter = adapter.eval()
        self.alpha = alpha
        self.never_sampled = torch.tensor(sorted(never_sampled), dtype=torch.long)
        self.generation_config = generation_config
        self.reset()

    @classmethod
    def from_pretrained(cls, path: str, dtype: Optional[torch.dtype] = None, device: Optional[str | torch.device] = None) -> "AdapterLogitsProcessor":
        """The processor of an adapter folder written by ``python -m lightning_ipa export``.

        Args:
            path: The folder (``config.json``, weights, ``ipa_adapter.json``, ``generation_config.json``).
            dtype: The adapter's dtype (None: as saved, float32).
            device: Where the adapter runs (None: CPU); the base's device, for ``generate``.

        Raises:
            FileNotFoundError: ``path`` has no ``ipa_adapter.json`` (not an exported adapter).
        """
        folder = Path(path)
        if not (folder / ADAPTER_FILE).is_file():
            raise FileNotFoundError(f"{folder} has no {ADAPTER_FILE}: not an adapter written by `python -m lightning_ipa export`")
        meta = json.loads((folder / ADAPTER_FILE).read_text())
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).requires_grad_(False).eval()
        adapter = Adapter(lm.base_model, lm.get_output_embeddings(), lm.get_output_embeddings().in_features)
        if meta.get("control") is not None:
            from safetensors.torch import load_file

            adapter.controls = nn.Embedding.from_pretrained(load_file(folder / CONTROL_FILE)["control"][None], freeze=True)
            adapter.control_mode = meta["control"]
        adapter.to(device or "cpu")
        return cls(adapter, meta["alpha"], meta["never_sampled"], GenerationConfig.from_pretrained(folder))

    @property
    def control_mode(self) -> Optional[ControlMode]:
        return None if self.adapter.controls is None else self.adapter.control_mode

    def reset(self, attention_mask: Optional[Tensor] = None) -> "AdapterLogitsProcessor":
        """Start afresh for a new ``generate`` call; ``attention_mask`` [B, P]: the prompts' (left padding), None: unpadded.

        Returns itself, to be passed as ``logits_processor=[processor.reset(mask)]``."""
        self.prompt_mask = attention_mask
        self.cache, self.mask, self.seen = None, None, None
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
            ids, mask = input_ids.to(device), self._prompt_mask(input_ids).to(device)
            positions, self.cache = position_ids(mask), None
        else:
            if not torch.equal(input_ids[:, :-1], self.seen):
                raise ValueError("the rows given to AdapterLogitsProcessor changed between steps: beam search (num_beams > 1) "
                                 "reorders them, which the adapter's cache cannot follow; use sampling or greedy search, and call "
                                 "reset() before each generate call")
            ids, mask = input_ids[:, -1:].to(device), torch.cat([self.mask, self.mask.new_ones(len(input_ids), 1)], dim=1)
            positions = self.positions[:, -1:] + 1
        control = self.adapter.sampling_control(len(ids), device)
        hidden, self.cache = self.adapter(ids, mask, positions, self.cache, use_cache=True, control=control)
        self.seen, self.mask, self.positions = input_ids, mask, positions
        logits = self.adapter.head(hidden[:, -1]).float().to(scores.device)
        tailored = scores.float().log_softmax(-1) + self.alpha * logits
        tailored[:, self.never_sampled.to(scores.device)] = float("-inf")
        return tailored

    def _prompt_mask(self, input_ids: Tensor) -> Tensor:
        """The prompts' attention mask [B, P]: ``reset``'s (repeated for ``num_return_sequences``), else all ones."""
        mask = self.prompt_mask
        if mask is None:
            pad = self.generation_config.pad_token_id if self.generation_config is not None else None
            first = input_ids[:, 0] == pad if pad is not None else None
            if first is not None and first.any() and not first.all() and len(input_ids) > 1:
                raise ValueError(f"some prompts start with the padding token {pad} and others not: they look left-padded; pass "
                                 "their attention mask with logits_processor=[processor.reset(inputs['attention_mask'])]")
            return torch.ones_like(input_ids)
        if mask.shape[1] != input_ids.shape[1] or len(input_ids) % len(mask):
            raise ValueError(f"reset() was given an attention mask of shape {tuple(mask.shape)}, but generate's prompts are "
                             f"{tuple(input_ids.shape)}: pass the mask of the inputs given to this generate call")
        return mask.repeat_interleave(len(input_ids) // len(mask), dim=0)  # num_return_sequences: rows repeated in place
