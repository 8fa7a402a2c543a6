"""Training-free policies from other LMs' logits (DExperts, proxy-tuning), measured on IPA's protocol.

Each is the base's next-token log-probs plus weighted log-probs of other frozen LMs of its vocabulary, decoded by
``TailoredPolicy``'s lockstep sampler (one forward of each model per generated token) with the evaluation's prompts,
seeds, sampling settings and metrics (``IPAModule(compare=[...])``): one results table, a column per policy.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bases import BaseDType, LocalBase, prompt_lengths
from .frozen import Frozen
from .policy import Sampling, TailoredPolicy, truncate
from .remote import RemoteBase
from .types import Prompts, position_ids


RESERVED = ("base", "tailored", "prompt", "metric", "convention")  # names other columns of the results already have


class LogitArithmetic(Frozen):
    """A policy made of a base and other LMs with no training: at each step

        log p(x | x_<t) = log_softmax(filter(log p_base) + Σ_i w_i · log p_i(x | x_<t))

    ``filter`` keeps the base's top-``filter_p`` nucleus (−inf elsewhere; 1.0: all). Adding log-probs or raw logits is
    the same policy: each model's normaliser is one constant per row, which the softmax drops. The models read the base's
    tokens (one vocabulary: refused otherwise), or with ``chat_templates`` each prompt's text as a user turn of their own
    chat template, then the same response tokens; a model whose output head is wider than the base's (padded vocabulary
    rows) is read on the base's ids, as proxy-tuning's code does.
    """

    def __init__(self, name: str, models: Sequence[Optional[str]], weights: Sequence[float], filter_p: float = 1.0,
                 top_p: Optional[float] = None, dtype: BaseDType = "auto", chat_templates: Optional[Sequence[bool]] = None):
        """
        Args:
            name: Its column in the results (``test/<metric>/<name>``): letters, digits, '_', '.', '-'; not one of ``RESERVED``.
            models: Each LM's hub name, folder or ``.gguf`` (None: the base's own log-probs, unfiltered).
            weights: Each LM's weight w_i (any sign).
            filter_p: Nucleus of the base kept before the others' log-probs are added (1.0: the whole vocabulary).
            top_p: Nucleus mass of the sampling (None: the evaluation's ``sampling.top_p``).
            dtype: The LMs' dtype ('auto': bfloat16 where the hardware runs it natively, else float32).
            chat_templates: Per model, whether it reads each prompt (the text of the base's prompt tokens, special
                tokens dropped) as a user turn of its own chat template (None: none do).

        Raises:
            ValueError: a reserved or empty name, models and weights (or chat_templates) of different lengths,
                ``filter_p`` or ``top_p`` outside (0, 1], a chat template asked of the base itself (None) or of a model
                without one.
        """
        super().__init__()
        if name in RESERVED or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"compare: a policy's name {name!r} is its results column and metric suffix: letters, digits, '_', '.', "
                             f"'-', and none of {list(RESERVED)} (the other columns of results.md and generations.jsonl)")
        chat_templates = [False] * len(models) if chat_templates is None else list(chat_templates)
        if not len(models) == len(weights) == len(chat_templates):
            raise ValueError(f"{name}: {len(models)} models, {len(weights)} weights and {len(chat_templates)} chat_templates")
        if any(chat and m is None for m, chat in zip(models, chat_templates)):
            raise ValueError(f"{name}: a chat template for the base itself (model None): it reads the base's own prompts")
        for what, p in (("filter_p", filter_p), ("top_p", top_p)):
            if p is not None and not 0 < p <= 1:
                raise ValueError(f"{name}: {what} must be in (0, 1], got {p}")
        self.name, self.weights, self.filter_p, self.top_p = name, [float(w) for w in weights], filter_p, top_p
        self.paths = list(models)
        self.models = nn.ModuleList([LocalBase(m, dtype, chat).requires_grad_(False) for m, chat in zip(models, chat_templates) if m is not None])

    @property
    def max_positions(self) -> Optional[int]:
        """The most tokens of the base's prompt + response its models read (None: none known): the smallest context
        window, less the tokens a chat template adds around a prompt for a model that reads one (``Combined`` checks
        the exact count of each prompt)."""
        windows = [m.max_positions - (prompt_lengths(m.tokenizer, [""], True, m.system_prompt)[0] if m.chat_template else 0)
                   for m in self.models if m.max_positions is not None]
        return min(windows) if windows else None

    def terms(self) -> list[Optional[LocalBase]]:
        """Each term's model (None: the base itself), in ``weights``' order."""
        models = iter(self.models)
        return [None if path is None else next(models) for path in self.paths]

    def check(self, base: LocalBase | RemoteBase) -> None:
        """Refuse, before any work, models whose vocabulary is not the base's.

        Raises:
            ValueError: a model whose tokenizer differs from the base's (heads padded to other sizes past the tokenizer
                are fine), or a model given its chat template over a base that already reads its prompts through one.
        """
        for path, model in zip(self.paths, self.terms()):
            if model is None:
                continue
            if model.tokenizer.get_vocab() != base.tokenizer.get_vocab() or len(base.tokenizer) > model.vocab_size:
                raise ValueError(
                    f"compare {self.name!r}: {path} ({len(model.tokenizer)} tokens, head of {model.vocab_size}) does not share the "
                    f"base's vocabulary ({len(base.tokenizer)} tokens, head of {base.vocab_size}, {base.path or 'remote'}): "
                    "logit arithmetic adds log-probs token by token, so every model needs the base's tokenizer"
                )
            if model.chat_template and base.chat_template:
                raise ValueError(f"compare {self.name!r}: {path} is to read each prompt through its chat template, but the base "
                                 "already does (model.base.chat_template): it reads the base's tokens as they are; drop its chat template")

    def policy(self, base: LocalBase | RemoteBase, sampling: Sampling) -> TailoredPolicy:
        """This policy as a ``TailoredPolicy`` without an adapter over ``base`` (its lockstep sampler, its ``generate``),
        with the evaluation's ``sampling`` (its own ``top_p``, if set), on the base's device."""
        sampling = sampling if self.top_p is None else replace(sampling, top_p=self.top_p)
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        return TailoredPolicy(Combined(base, self, sampling), None, sampling=sampling).to(device)

    def combine(self, base_logprobs: Tensor, logprobs: list[Tensor]) -> Tensor:
        """The policy's log-probs [..., V] from the base's [..., V] and each model's term ([..., V'], in ``weights``'
        order; the base's own log-probs for a model None). Tokens outside the base's support (or nucleus) stay at −inf
        whatever the terms add there (a negative weight on a −inf term would give +inf); a head wider than the base's is
        read on the base's ids; the ids a narrower one lacks (the base's head padded past its tokenizer: no token) get
        −inf, so that no model is ever fed an id it cannot read."""
        scores = base_logprobs
        if self.filter_p < 1:
            flat = base_logprobs.reshape(-1, base_logprobs.shape[-1])
            kept = truncate(flat, top_p=self.filter_p)
            mask = torch.zeros_like(flat).scatter_add_(-1, kept.ids, kept.logprobs.isfinite().float()) > 0
            scores = flat.masked_fill(~mask, float("-inf")).view_as(base_logprobs)
        vocab = base_logprobs.shape[-1]
        for weight, lp in zip(self.weights, logprobs):
            lp = lp[..., :vocab] if lp.shape[-1] >= vocab else F.pad(lp, (0, vocab - lp.shape[-1]), value=float("-inf"))
            scores = (scores + weight * lp).masked_fill((scores == float("-inf")) | (lp == float("-inf")), float("-inf"))
        return scores.log_softmax(-1)


class DExperts(LogitArithmetic):
    """DExperts (Liu et al., "DExperts: Decoding-Time Controlled Text Generation with Experts and Anti-Experts", ACL 2021):
    ``filter_p(base) + α·(expert − anti_expert)``, as ``generation/dexperts_generation.py`` of alisawuffles/DExperts
    computes it: the base's logits cut to their top-``filter_p`` nucleus, the experts' logits added, then temperature
    and the sampling's own top-p (``p``: 1.0 in its toxicity runs, ``scripts/our_scripts/toxicity/dexperts.sh``:
    α = 2.0, ``filter_p`` 0.9). A missing expert or anti-expert is the base itself, as there.
    """

    def __init__(self, expert: Optional[str] = None, anti_expert: Optional[str] = None, alpha: float = 2.0, filter_p: float = 0.9,
                 top_p: Optional[float] = 1.0, dtype: BaseDType = "auto", name: str = "dexperts"):
        """
        Args:
            expert: The expert LM (DExperts' toxicity runs: GPT-2 large fine-tuned on non-toxic text); None: the base.
            anti_expert: The anti-expert LM (GPT-2 large fine-tuned on toxic text); None: the base.
            alpha: Steering strength α (DExperts' toxicity runs: 2.0; 0: the base's filtered nucleus).
            filter_p: The base's nucleus before the experts are added (DExperts: 0.9).
            top_p: Nucleus of the sampling of the ensemble (DExperts: 1.0; None: the evaluation's).
            dtype: The experts' dtype.
            name: Its column in the results.
        """
        super().__init__(name, [expert, anti_expert], [alpha, -alpha], filter_p, top_p, dtype)


class ProxyTuning(LogitArithmetic):
    """Proxy-tuning (Liu et al., "Tuning Language Models by Proxy", COLM 2024): ``base + α·(tuned − untuned)``, as
    ``DExpertsLlama.generate`` of alisawuffles/proxy-tuning computes it (α = 1 in the paper): a small model's tuning
    carried over to the base as the difference of the tuned and untuned small models' logits; then the sampling's
    temperature and top-p. A chat-tuned model reads its prompt in its chat format there: ``tuned_chat_template``.
    """

    def __init__(self, tuned: str, untuned: str, alpha: float = 1.0, top_p: Optional[float] = None, dtype: BaseDType = "auto",
                 tuned_chat_template: bool = False, name: str = "proxy_tuning"):
        """
        Args:
            tuned: The tuned small LM (the proxy-tuning paper: Llama-2-7b-chat).
            untuned: The same small LM before tuning (Llama-2-7b).
            alpha: Weight of the difference (the paper: 1.0).
            top_p: Nucleus of the sampling (None: the evaluation's).
            dtype: The models' dtype.
            tuned_chat_template: The tuned model reads each prompt as a user turn of its chat template, as proxy-tuning's
                code gives its chat experts (``[INST] prompt [/INST]``); base and untuned model read the plain prompt.
            name: Its column in the results.
        """
        super().__init__(name, [tuned, untuned], [alpha, -alpha], 1.0, top_p, dtype, [tuned_chat_template, False])


class Caches(list):
    """The KV caches of the base and the other models, one per model (None: a model that is the base), and for each model
    that reads the prompts in its own chat format (by index), its prompts' attention mask [B, P_i], the offset [B] of its
    positions from the base's, and the base's prompt width."""

    def __init__(self, caches: list, prompts: Optional[dict[int, tuple[Tensor, Tensor, int]]] = None, step: int = 0):
        super().__init__(caches)
        self.prompts = dict(prompts or {})
        self.step = step  # the response position the next token takes

    def batch_repeat_interleave(self, k: int) -> None:
        for cache in self:
            if cache is not None:
                cache.batch_repeat_interleave(k)
        self.prompts = {i: (mask.repeat_interleave(k, 0), offset.repeat_interleave(k, 0), width) for i, (mask, offset, width) in self.prompts.items()}


class Combined(Frozen):
    """The base as ``TailoredPolicy``'s sampler reads it, with a ``LogitArithmetic`` applied: the base's interface
    (tokenizer, stop tokens, ``encode``, ``forward`` with a KV cache), its log-probs combined. For sampling only.

    Before ``min_new_tokens`` the base's stop tokens are banned before its nucleus is taken (a base sure to stop would
    otherwise leave a nucleus of stop tokens only), as the policy bans them before it samples."""

    def __init__(self, base: LocalBase | RemoteBase, arithmetic: LogitArithmetic, sampling: Sampling):
        super().__init__()
        self.base, self.arithmetic, self.sampling = base, arithmetic, sampling
        stops = torch.zeros(base.vocab_size, dtype=torch.bool)
        stops[base.stop_ids] = True
        self.register_buffer("stops", stops, persistent=False)
        self.tokenizer, self.path, self.stop_ids = base.tokenizer, base.path, base.stop_ids
        self.chat_template, self.system_prompt = base.chat_template, base.system_prompt
        windows = [w for w in (base.max_positions, arithmetic.max_positions) if w is not None]
        self.max_positions = min(windows) if windows else None

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def full_support(self) -> bool:
        return self.base.full_support and self.arithmetic.filter_p >= 1

    @property
    def support_size(self) -> Optional[int]:
        return self.base.support_size

    def encode(self, prompts: list[str]) -> Prompts:
        return self.base.encode(prompts)

    @torch.no_grad()
    def forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Optional[Caches] = None, body=None) -> tuple[Tensor, Caches]:
        """``LocalBase.forward``: the combined next-token log-probs [B, V] after the last position, and the caches.

        The first call (no cache) reads the prompts; a model with a chat template reads each as a user turn of its own
        (``LocalBase.encode`` of the prompt's text), then the same new tokens at its own positions."""
        models, first = self.arithmetic.terms(), cache is None
        cache = Caches([None] * (1 + len(models))) if first else cache
        base_logprobs, base_cache = self.base(ids, mask, positions, cache[0])
        nucleus_of = base_logprobs
        if cache.step < self.sampling.min_new_tokens:  # no stop yet: banned (where the support has another token), renormalised
            banned = self.stops & (base_logprobs.masked_fill(self.stops, float("-inf")) > float("-inf")).any(-1, keepdim=True)
            nucleus_of = base_logprobs.masked_fill(banned, float("-inf")).log_softmax(-1)
        logprobs, caches = [], Caches([base_cache], cache.prompts, cache.step + 1)
        for i, (model, model_cache) in enumerate(zip(models, cache[1:])):
            own_ids, own_mask, own_positions = ids, mask, positions
            if model is not None and model.chat_template and first:
                texts = [self.tokenizer.decode(row[real.bool()], skip_special_tokens=True) for row, real in zip(ids, mask)]
                own_ids, own_mask = model.encode(texts)
                self.check_window(model, own_mask, texts)
                own_positions = position_ids(own_mask)
                caches.prompts[i] = (own_mask, own_positions[:, -1] - positions[:, -1], ids.shape[1])
            elif model is not None and model.chat_template:
                prompt_mask, offset, width = cache.prompts[i]
                own_mask, own_positions = torch.cat([prompt_mask, mask[:, width:]], dim=1), positions + offset[:, None]
            lp, model_cache = (base_logprobs, None) if model is None else model(own_ids, own_mask, own_positions, model_cache)
            logprobs.append(lp)
            caches.append(model_cache)
        return self.arithmetic.combine(nucleus_of, logprobs), caches

    def check_window(self, model: LocalBase, mask: Tensor, texts: list[str]) -> None:
        """Refuse prompts that, in ``model``'s chat format, leave no room in its window for ``max_new_tokens``.

        Raises:
            ValueError: naming the longest such prompt, its tokens and the window.
        """
        lengths = mask.sum(-1).tolist()
        longest = max(range(len(texts)), key=lambda i: lengths[i])
        if model.max_positions is not None and lengths[longest] + self.sampling.max_new_tokens > model.max_positions:
            raise ValueError(
                f"compare {self.arithmetic.name!r}: a prompt ({texts[longest][:60]!r}) takes {lengths[longest]} tokens in the chat "
                f"format of {model.path}, which leaves less than max_new_tokens={self.sampling.max_new_tokens} of its "
                f"{model.max_positions}-token window: shorten the prompts (--model.sampling.long_prompts=cut_left cuts to "
                "LogitArithmetic.max_positions, which allows for the template's own tokens)"
            )
