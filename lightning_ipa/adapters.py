"""The trainable adapter LM p_φ: a transformer body with its own output head."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import Tensor, nn

from .bases import DType, LocalBase, load_causal_lm, load_tokenizer, max_positions, resolve_pretrained, scale_logits, scales_logits
from .remote import RemoteBase

ControlMode = Literal["prefix", "every_token"]


@dataclass(frozen=True)
class AdapterConfig:
    """How to build the adapter.

    Args:
        name_or_path: Adapter checkpoint (hub name, folder, .gguf); None: the base's own checkpoint.
        num_layers: Keep only the first k transformer layers (exactly the checkpoint's tensors); None: all.
        head: Output head. 'projection': the checkpoint's frozen LM head (run in the base's dtype)
            after a zero-initialised H×H projection, so the tailored policy starts exactly at the
            base (H² trainable weights; learnt fastest in the quickstart). 'zeros': a fresh untied
            V×H head initialised to 0 (also starts at the base). 'pretrained': the checkpoint's own
            LM head (the paper's plain product of experts).
        train_embeddings: Train the input embeddings too (a tied 'pretrained' head always trains them).
        dtype: Adapter weights' dtype (trained; keep float32 unless using mixed precision).
    """

    name_or_path: Optional[str] = None
    num_layers: Optional[int] = 2
    head: Literal["zeros", "projection", "pretrained"] = "projection"
    train_embeddings: bool = False
    dtype: DType = "float32"


class Adapter(nn.Module):
    """A transformer body and an output head over the base's vocabulary, optionally with control codes."""

    def __init__(self, body: nn.Module, head: nn.Module, hidden_size: int):
        super().__init__()
        self.body = body
        self.head = head  # hidden states [..., H] → logits [..., V]
        self.hidden_size = hidden_size
        self.controls: Optional[nn.Embedding] = None
        self.control_mode: ControlMode = "prefix"
        self.max_positions = max_positions(body.config)  # its context window (None: unbounded)

    @property
    def max_tokens(self) -> Optional[int]:
        """The most prompt + response tokens it reads: its context window, less one for a prefix control code (None: unbounded)."""
        return None if self.max_positions is None else self.max_positions - self.prefix_length

    def add_controls(self, n: int, mode: ControlMode = "prefix") -> None:
        """Give the adapter ``n`` trainable control codes (Quark's reward quantiles).

        A code is an embedding only the adapter reads: ``mode`` 'prefix' reads it as one more input
        position before the prompt (Quark's control token), 'every_token' adds it to the input
        embedding of every token. It is not a token of the vocabulary, so the base never sees it and
        it can never be sampled. The policy samples with code 0 (rollouts and inference alike); the
        others appear in training data only.
        """
        embeddings = self.body.get_input_embeddings().weight
        self.controls = nn.Embedding(n, self.hidden_size, dtype=embeddings.dtype, device=embeddings.device)
        nn.init.normal_(self.controls.weight, std=embeddings.detach().float().std().item())
        self.control_mode = mode

    def sampling_control(self, batch: int, device: torch.device) -> Optional[Tensor]:
        """The code the policy samples with, for each of ``batch`` rows [B] (None without codes)."""
        return None if self.controls is None else torch.zeros(batch, dtype=torch.long, device=device)

    def fresh_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that start from scratch (head, control codes): they get ``head_lr``."""
        fresh = [*self.head.parameters(), *(self.controls.parameters() if self.controls is not None else [])]
        return [p for p in fresh if p.requires_grad]

    @classmethod
    def build(cls, config: AdapterConfig, base: LocalBase | RemoteBase) -> "Adapter":
        """Load the adapter described by ``config``; its vocabulary must be the base's."""
        path = resolve_pretrained(config.name_or_path) if config.name_or_path else base.path
        if path is None:
            raise ValueError("the base is remote (no local weights to build the adapter from): set adapter.name_or_path "
                             "to a local checkpoint with the base's tokenizer, e.g. its distilled proxy")
        if path != base.path:
            check_same_vocabulary(base, path)
        overrides = {} if config.num_layers is None else {"num_hidden_layers": config.num_layers}
        lm = load_causal_lm(path, config.dtype, **overrides)
        pretrained_head = lm.get_output_embeddings()
        if pretrained_head.out_features != base.vocab_size:
            raise ValueError(
                f"adapter {path} predicts {pretrained_head.out_features} tokens but base {base.path} predicts "
                f"{base.vocab_size}; IPA adds their log-probs token by token, so both need one vocabulary"
            )
        body = lm.base_model
        body.get_input_embeddings().requires_grad_(config.train_embeddings)
        hidden, dtype = pretrained_head.in_features, pretrained_head.weight.dtype
        if config.head == "pretrained":  # the checkpoint's distribution, its family's scaling of the logits included
            head = pretrained_head.requires_grad_(True)
            head = ScaledHead(head, lm.config) if scales_logits(lm.config) else head
        elif config.head == "projection":
            head = ProjectedHead(pretrained_head, frozen_dtype=base.dtype)
        else:
            head = zeros_linear(hidden, pretrained_head.out_features, dtype)
        return cls(body, head, hidden)

    @property
    def prefix_length(self) -> int:
        """Positions the adapter reads before a prompt: 1 with a control-code prefix (``add_controls``), else 0."""
        return int(self.controls is not None and self.control_mode == "prefix")

    def forward(
        self, ids: Tensor, mask: Tensor, positions: Tensor, cache=None, use_cache: bool = False, control: Optional[Tensor] = None,
        body: Optional[Callable] = None,
    ) -> tuple[Tensor, object]:
        """Last hidden states [B, L, H] of the new tokens, and the KV cache (when ``use_cache``).

        ``control`` [B]: each row's control code (see ``add_controls``); pass it on every call for one
        sequence (as a prefix, the code shifts the adapter's mask and positions by one). ``body``: what runs the
        transformer (default ``self.body``; a compiled one for decoding steps).
        """
        body = self.body if body is None else body
        if control is None:
            out = body(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=use_cache)
            return out.last_hidden_state, out.cache
        embeds = self.body.get_input_embeddings()(ids)
        if self.control_mode == "every_token":
            embeds = embeds + self.controls(control)[:, None].to(embeds.dtype)
            out = body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=use_cache)
            return out.last_hidden_state, out.cache
        mask = torch.cat([mask.new_ones(len(ids), 1), mask], dim=1)
        positions = positions + 1
        first_call = cache is None or not cache.is_initialized
        if first_call:
            embeds = torch.cat([self.controls(control)[:, None].to(embeds.dtype), embeds], dim=1)
            positions = torch.cat([positions.new_zeros(len(ids), 1), positions], dim=1)
        out = body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=use_cache)
        hidden = out.last_hidden_state[:, 1:] if first_call else out.last_hidden_state
        return hidden, out.cache


class ScaledHead(nn.Module):
    """A pretrained LM head followed by what its family's forward does to the logits (``bases.scale_logits``: Gemma 2/3
    softcapping, Cohere's and Granite's scales), so that a 'pretrained' head gives the checkpoint's own distribution."""

    def __init__(self, linear: nn.Linear, config):
        super().__init__()
        self.linear = linear
        self.config = config

    def forward(self, hidden: Tensor) -> Tensor:
        return scale_logits(self.config, self.linear(hidden))


class ProjectedHead(nn.Module):
    """A trainable H×H projection, zero at start, before a frozen copy of a pretrained LM head.

    The copy is untied from the input embeddings (which may train) and runs in ``frozen_dtype``,
    the base's: the frozen V×H matrix is the adapter's largest matmul, in sampling and in the loss.
    """

    def __init__(self, lm_head: nn.Linear, frozen_dtype: torch.dtype):
        super().__init__()
        self.projection = zeros_linear(lm_head.in_features, lm_head.in_features, lm_head.weight.dtype)
        self.lm_head = copy.deepcopy(lm_head).requires_grad_(False).to(frozen_dtype)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.projection(hidden).to(self.lm_head.weight.dtype))


def zeros_linear(in_features: int, out_features: int, dtype) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=False, dtype=dtype)
    nn.init.zeros_(layer.weight)
    return layer


def check_same_vocabulary(base: LocalBase | RemoteBase, adapter_path: str) -> None:
    """Fail at start-up, with both sizes, when the adapter's tokenizer differs from the base's."""
    adapter_tokenizer = load_tokenizer(adapter_path)
    if adapter_tokenizer.get_vocab() != base.tokenizer.get_vocab():
        raise ValueError(
            f"adapter tokenizer ({len(adapter_tokenizer)} tokens, {adapter_path}) differs from the base "
            f"tokenizer ({len(base.tokenizer)} tokens, {base.path}); IPA combines the two models token by "
            "token, so they must share one tokenizer: choose an adapter of the base's family, or leave "
            "adapter.name_or_path unset to build the adapter from the base's first layers"
        )

