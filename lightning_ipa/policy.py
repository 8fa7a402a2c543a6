"""The tailored policy: p(x_t | x_<t) ∝ p_base(x_t | x_<t) · p_adapter(x_t | x_<t)^α."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, NamedTuple, Optional, Union, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import StaticCache

from .adapters import Adapter
from .bases import LocalBase, prompt_lengths
from .frozen import Frozen
from .remote import RemoteBase
from .types import PolicyOutput, Prompts, Responses, Rollout, position_ids, sequence

NUCLEUS_CANDIDATES = 1024  # top-k/top-p look at this many best tokens first; rows whose kept set is wider look among 4× as many
# forward() scores tokens in blocks of at most this many [tokens × vocabulary] floats (16 MB): under glibc's
# 32 MB mmap threshold, so they are reused from the heap rather than mapped and zeroed afresh (~2× faster on CPU)
EVALUATE_BLOCK = 1 << 22
RolloutMemory = Literal["auto", "full", "bfloat16", "top_k", "recompute"]
Decoding = Literal["auto", "eager", "static", "compiled"]
STATIC_CACHE_BLOCK = 64  # static KV caches hold prompt + max_new_tokens rounded up to this: fewer shapes to compile
STEP_RECOMPILE_LIMIT = 64  # compiled entries the decoding steps of all models may take together (step_body)
ROLLOUT_MEMORY_BUDGET = 4 << 30  # bytes: 'auto' keeps a rollout's [B, T, V] float32 base distributions up to this size


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of the tailored policy (rollouts, validation and predict alike).

    Args:
        max_new_tokens: Response length limit in tokens.
        min_new_tokens: EOS is impossible before this many tokens (part of the policy, so the loss sees it too).
        temperature: Divides the combined log-probs; part of the policy's distribution.
        top_k: Sample among the k most likely tokens only, ties with the k-th included (0: off). A sampling
            filter, not part of the loss (transformers' ``TopKLogitsWarper``).
        top_p: Nucleus sampling mass (1.0: off). A sampling filter, not part of the loss (transformers'
            ``TopPLogitsWarper``, applied after top-k).
        min_tokens_to_keep: Top-k and top-p never keep fewer tokens than this (transformers' ``min_tokens_to_keep``).
        long_prompts: A prompt with more tokens than fit in the context window with ``max_new_tokens`` after it (the
            smallest window of base, adapter and other readers: ``TailoredPolicy.context_window``): 'refuse' (an error naming it; ``IPAModule`` checks every prompt of
            the splits a run reads before any work) or 'cut_left' (the first tokens of its text are dropped; BOS and the
            chat template's turns stay; the first cut warns, and the counts are logged as ``train/prompts_cut`` per
            rollout and ``val/prompts_cut``/``test/prompts_cut`` per evaluation).
        decoding: How base and adapter decode one token per step: 'eager' (growing ``DynamicCache``s, each layer a
            kernel launch from Python), 'static' (transformers' ``StaticCache``: pre-allocated, fixed-shape KV caches),
            'compiled' (static caches, and each model's one-token step compiled once with ``torch.compile``, fullgraph:
            on CUDA in mode "reduce-overhead", i.e. replayed as a CUDA graph; on CPU by inductor), or 'auto' (compiled
            on CUDA, eager elsewhere). Every mode draws the same tokens for the same seed (up to float rounding);
            sampling itself (top-k/top-p, the draw) stays eager. A remote base keeps its own cache (only the adapter's
            step is static or compiled). Compiling takes two shapes of (rows, prompt width rounded up to
            ``STATIC_CACHE_BLOCK``): the first as is, then one with dynamic sizes (``TailoredPolicy.step_body``).
    """

    max_new_tokens: int = 32
    min_new_tokens: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_tokens_to_keep: int = 1
    long_prompts: Literal["refuse", "cut_left"] = "refuse"
    decoding: Decoding = "auto"

    def __post_init__(self):
        if not 1 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"need 1 <= min_new_tokens ({self.min_new_tokens}) <= max_new_tokens ({self.max_new_tokens})")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.min_tokens_to_keep < 1:
            raise ValueError(f"need temperature > 0, 0 < top_p <= 1, top_k >= 0 and min_tokens_to_keep >= 1; got {self}")
        if self.long_prompts not in ("refuse", "cut_left"):
            raise ValueError(f"long_prompts must be 'refuse' or 'cut_left', got {self.long_prompts!r}")
        if self.decoding not in get_args(Decoding):
            raise ValueError(f"decoding must be one of {list(get_args(Decoding))}, got {self.decoding!r}")


class Truncated(NamedTuple):
    """A distribution restricted to the tokens a top-k / top-p filter keeps, renormalised: what is sampled."""

    ids: Optional[Tensor]  # [B, W] candidate token ids, most likely first (None: the whole vocabulary, W = V)
    logprobs: Tensor  # [B, W] log-probs of the candidates; −inf for those the filter drops

    def sample(self, generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None) -> Tensor:
        """One token id per row [B].

        With ``vocab_size``, drawn as transformers' ``generate`` draws: ``torch.multinomial`` over the probabilities of the
        whole vocabulary (0 where the filter dropped a token), so the same generator state draws the same tokens as
        ``generate`` does from the same distribution (``torch.multinomial`` takes one exponential variate per vocabulary
        entry: argmax p / q). Without it, among the candidates only: the same distribution, from fewer random numbers
        (another stream; on 2 CPU cores 0.4 ms rather than 19 ms for 16 rows of 49,152 tokens)."""
        probs = self.logprobs.exp()
        if vocab_size is not None and self.ids is not None:  # the candidates' probabilities in their vocabulary places
            probs = probs.new_zeros(len(probs), vocab_size).scatter_add_(-1, self.ids, probs)  # add: widened rows pad ids with 0 at p = 0
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        choice = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
        return (choice if self.ids is None else self.ids.gather(-1, choice)).squeeze(-1)


def kl_divergence(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Exact KL(p ‖ ref) [...] in nats of two distributions given as log-probs [..., V].

    Σ_v p(v)·(log p(v) − log ref(v)); tokens p gives no mass count 0 (also in the gradient: log-probs
    are clamped to the lowest float rather than −inf).
    """
    lowest = torch.finfo(logprobs.dtype).min
    return (logprobs.exp() * (logprobs.clamp(min=lowest) - ref_logprobs.clamp(min=lowest))).sum(-1)


def truncate(logprobs: Tensor, top_k: int = 0, top_p: float = 1.0, min_tokens_to_keep: int = 1) -> Truncated:
    """The distribution that is sampled: log-probs [B, V] filtered by top-k, then top-p, and renormalised.

    The set that transformers' ``TopKLogitsWarper`` then ``TopPLogitsWarper`` keep (as ``generate`` orders
    them): top-k keeps every token at least as likely as the k-th, ties included; top-p sorts ascending
    and drops tokens while the mass up to and including them is ≤ 1 − p; both keep at least
    ``min_tokens_to_keep``. Among equally likely tokens at the nucleus boundary we drop the lowest ids
    first: transformers' result whenever its ``torch.sort`` is stable (on CPU, up to 16 tokens); beyond,
    that order is unspecified and it keeps as many tokens of the same probability, perhaps other ids.
    A cumulative mass within float rounding of the threshold can also fall the other way (we sum in
    the other order). Without sorting the vocabulary: the set is sought among the best
    ``NUCLEUS_CANDIDATES`` tokens (or k + 1, if more); the rows whose boundary reaches past them look
    again among 4× as many, and so on up to the whole vocabulary.

    Returns:
        ``Truncated``: the kept candidates' ids and renormalised log-probs ([B, W]; ids None when nothing is filtered).
    """
    vocab = logprobs.shape[-1]
    k = min(max(top_k, min_tokens_to_keep), vocab) if top_k else vocab
    if k == vocab and top_p >= 1.0:
        return Truncated(None, logprobs)
    width = min(vocab, max(NUCLEUS_CANDIDATES, min_tokens_to_keep, k + 1 if k < vocab else 0))  # k + 1: to see the k-th's ties
    truncated, decided = _truncate_ranked(*_ranked(logprobs, width), vocab, k, top_p, min_tokens_to_keep)
    while not decided.all():  # rows whose boundary reaches past the candidates (rare): 4× the candidates for them
        wide = (~decided).nonzero().squeeze(-1)
        width = min(vocab, 4 * width)
        more, decided[wide] = _truncate_ranked(*_ranked(logprobs[wide], width), vocab, k, top_p, min_tokens_to_keep)
        # the kept tokens lead the ranking, so the widest kept set bounds every row
        kept = max(truncated.ids.shape[-1], int(more.logprobs.isfinite().sum(-1).max()))
        ids, lps = (F.pad(x, (0, kept - x.shape[-1]), value=fill) for x, fill in ((truncated.ids, 0), (truncated.logprobs, float("-inf"))))
        ids[wide], lps[wide] = more.ids[:, :kept], more.logprobs[:, :kept]  # kept ≤ width: it fits
        truncated = Truncated(ids, lps)
    return truncated


def _ranked(logprobs: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The ``width`` most likely tokens [B, W] (values, ids): by log-prob descending, equal log-probs by id descending."""
    if width == logprobs.shape[-1]:  # one stable sort of the reversed vocabulary
        values, order = logprobs.flip(-1).sort(dim=-1, descending=True, stable=True)
        return values, width - 1 - order
    values, ids = logprobs.topk(width, dim=-1)
    ids, order = ids.sort(dim=-1, descending=True)
    values, order = values.gather(-1, order).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, order)


def _truncate_ranked(values: Tensor, ids: Tensor, vocab: int, k: int, top_p: float, min_keep: int) -> tuple[Truncated, Tensor]:
    """Top-k then top-p over ranked candidates [B, W]; also [B] whether each row's kept set is certain from them alone."""
    decided = torch.full_like(values[:, 0], values.shape[-1] == vocab, dtype=torch.bool)
    if k < vocab:  # top-k: drop what is less likely than the k-th, renormalise the rest
        kth = values[:, k - 1 : k]
        decided |= values[:, -1] < kth[:, 0]  # the k-th value's ties all lie among the candidates
        values = values.masked_fill(values < kth, float("-inf")).log_softmax(-1)
    if top_p < 1.0:  # top-p: drop a token once the mass ranked before it reaches p
        probs = values.exp()
        keep = probs.cumsum(-1) - probs < top_p
        keep[:, :min_keep] = True
        if k == vocab:  # certain if the tokens strictly more likely than the last candidate hold p already
            decided |= (probs * (values > values[:, -1:])).sum(-1) >= top_p
        values = values.masked_fill(~keep, float("-inf"))
    return Truncated(ids, values.log_softmax(-1)), decided


def product_of_experts(base_logprobs: Tensor, adapter_logits: Optional[Tensor], alpha: float, never_sampled: Tensor, stops: Tensor,
                       early: Tensor, full_support: bool) -> Tensor:
    """The tailored policy's unnormalised log-probs before temperature [..., V]: ``base_logprobs + α·adapter_logits``
    (``adapter_logits`` None: the base alone), with ``never_sampled`` [V] tokens, and the ``stops`` [V] where ``early``
    [...] (before ``min_new_tokens``), set to −inf. Where a base whose support is not ``full_support`` (top-k) has no
    token left, the bans give way for that row: first the ban on stopping early, then the ban on padding.
    ``TailoredPolicy.scores`` and ``AdapterLogitsProcessor`` both compute it."""
    scores = base_logprobs if adapter_logits is None else base_logprobs + alpha * adapter_logits.float()
    banned = never_sampled | (stops & early[..., None])  # [..., V]
    if not full_support:  # a top-k support can lie inside the bans (a whole vocabulary cannot)
        supported = base_logprobs > float("-inf")
        empty = ~(supported & ~banned).any(-1, keepdim=True)  # [..., 1] rows the bans would leave with nothing
        banned = torch.where(empty, never_sampled & (supported & ~never_sampled).any(-1, keepdim=True), banned)
    return scores.masked_fill(banned, float("-inf"))


def long_prompts_error(long: list[tuple[int, int]], prompts: list[str], room: int, max_new_tokens: int, where: str, windows: str) -> str:
    """The message that refuses prompts too long for the context window: which (index, tokens, start), the limit, the fixes."""
    shown = "; ".join(f"#{i}: {n} tokens ({prompts[i][:60]!r}{'…' * (len(prompts[i]) > 60)})" for i, n in long[:5])
    more = f" and {len(long) - 5} more" if len(long) > 5 else ""
    return (
        f"{len(long)} prompt{'s' * (len(long) != 1)} of {where} {'are' if len(long) != 1 else 'is'} longer than the {room} tokens that fit in "
        f"the context window ({windows}) before max_new_tokens={max_new_tokens}: {shown}{more}. Cut them from the left "
        "(--model.sampling.long_prompts=cut_left), lower --model.sampling.max_new_tokens, or shorten the prompts"
    )


def _pick(logprobs: Tensor, token: Tensor, alive: Tensor) -> Tensor:
    """Log-prob [B] of each row's token; 0 for finished rows."""
    return logprobs.gather(-1, token[:, None]).squeeze(-1).masked_fill(~alive, 0.0)


class TokenStats(torch.autograd.Function):
    """Per token, from the policy's scores z [n, V] (π = softmax(z)): log π(y) of the chosen token, the entropy H(π) and,
    given the reference's log-probs, the exact KL(π ‖ ref), each [n], with a hand-written backward.

    What the loss's pass would otherwise keep for backward is several [n, V] tensors per block (log π, exp and clamp
    for the entropy, exp, clamp and difference for the KL: 25 bytes per token and vocabulary entry, measured on the
    Llama-3 vocabulary); this keeps log π and the reference only (8 bytes, 4 without the KL). The gradients are the
    closed forms, per row: ∂log π(y)/∂z = onehot(y) − π, ∂H/∂z = −π ⊙ (log π + H), ∂KL/∂z = π ⊙ (log π − log ref − KL),
    with tokens of probability 0 (banned, outside a top-k support) contributing 0. Forward values are those of
    ``kl_divergence`` and of −Σ π·log π (tokens of probability 0 count 0).
    """

    @staticmethod
    def forward(ctx, scores: Tensor, tokens: Tensor, ref_logprobs: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        logprobs = scores.log_softmax(-1)
        lowest = torch.finfo(logprobs.dtype).min
        probs, clamped = logprobs.exp(), logprobs.clamp(min=lowest)
        token_lp = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        entropy = -(probs * clamped).sum(-1)
        # ``kl_divergence``'s sum, from the π and clamped log π already at hand
        kl = entropy.new_zeros(entropy.shape) if ref_logprobs is None else (probs * (clamped - ref_logprobs.clamp(min=lowest))).sum(-1)
        ctx.save_for_backward(logprobs, tokens, entropy, kl, ref_logprobs)
        return token_lp, entropy, kl

    @staticmethod
    def backward(ctx, grad_token_lp: Tensor, grad_entropy: Tensor, grad_kl: Tensor) -> tuple[Tensor, None, None]:
        logprobs, tokens, entropy, kl, ref_logprobs = ctx.saved_tensors
        probs = logprobs.exp()
        live = probs > 0  # elsewhere π·(…) is 0: read 0 there rather than −inf
        safe = torch.where(live, logprobs, 0.0)
        inner = -grad_entropy[:, None] * (safe + entropy[:, None]) - grad_token_lp[:, None]
        if ref_logprobs is not None:
            inner = inner + grad_kl[:, None] * (safe - torch.where(live, ref_logprobs, 0.0) - kl[:, None])
        grad = (probs * inner).scatter_add_(-1, tokens[:, None], grad_token_lp[:, None])
        return grad, None, None


class TailoredPolicy(Frozen):
    """Base and adapter decoded in lockstep as a product of experts.

    ``log_softmax(base) + α·adapter`` (then temperature) defines the policy everywhere: in
    rollouts, in the training loss and at inference. Top-k/top-p only filter what is sampled.
    Without an adapter it samples the base alone (``use_adapter=False``), e.g. a teacher to distil. It stays in eval mode
    (``Frozen``: no dropout, so rollout and loss see one distribution); the adapter's parameters still train.
    """

    def __init__(
        self, base: LocalBase | RemoteBase, adapter: Optional[Adapter], alpha: float = 1.0, sampling: Sampling = Sampling(),
        readers: Optional[dict[str, Optional[int]]] = None,
    ):
        """``readers``: the context windows of other models that read prompt + response, by name (a distilled student).

        Raises ValueError for an ``alpha`` (the adapter's weight α) that is negative or not finite."""
        if not 0 <= alpha < float("inf"):
            raise ValueError(
                f"alpha must be ≥ 0 and finite, got {alpha}: it weighs the adapter in log_softmax(base) + α·adapter (0: the base "
                "alone, 1: the product of experts); a negative α inverts the adapter, making what it favours less likely (--model.alpha)"
            )
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.alpha = alpha
        self.sampling = sampling
        self.readers = dict(readers or {})
        tokenizer = base.tokenizer
        self.pad_id = tokenizer.pad_token_id  # fills finished rows; masks leave those positions out
        stops = torch.zeros(base.vocab_size, dtype=torch.bool)
        stops[base.stop_ids] = True
        never = torch.zeros(base.vocab_size, dtype=torch.bool)
        # a dedicated padding token is never sampled; one borrowed from EOS (GPT-2, Pythia) or a stop token (Qwen's
        # <|endoftext|>) is a real token of the model and keeps its probability
        never[self.pad_id] = not stops[self.pad_id] and self.pad_id != tokenizer.eos_token_id
        self.register_buffer("stops", stops, persistent=False)  # [V] the tokens that end a response (base.stop_ids)
        self.register_buffer("never_sampled", never, persistent=False)  # [V]
        self.compiled: dict[int, Callable] = {}  # id(model body) → its compiled one-token step (decoding='compiled')
        self.prompts_cut = 0  # prompts cut from the left to fit the context window (long_prompts='cut_left'), in all
        self.last_cut = 0  # of them, in the last ``encode``
        self.context_window()  # refuses a window that max_new_tokens alone fills

    def windows(self) -> dict[str, int]:
        """The context windows that bound prompt + response, by model: base, adapter (``Adapter.max_tokens``) and ``readers``."""
        windows = {"base": self.base.max_positions, "adapter": self.adapter.max_tokens if self.adapter is not None else None, **self.readers}
        return {name: window for name, window in windows.items() if window is not None}

    def context_window(self) -> Optional[int]:
        """The most tokens a prompt may have: the smallest of ``windows()`` less ``max_new_tokens``; None where no window is known.

        Raises:
            ValueError: ``max_new_tokens`` leaves no room for a prompt.
        """
        windows = self.windows()
        if not windows:
            return None
        room = min(windows.values()) - self.sampling.max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens={self.sampling.max_new_tokens} leaves no room for a prompt in a context window of "
                             f"{min(windows.values())} tokens ({self.windows_text()}): lower sampling.max_new_tokens")
        return room

    def windows_text(self) -> str:
        """``windows()`` for messages, e.g. 'base 2048, adapter 2048, student 1024'."""
        return ", ".join(f"{name} {window}" for name, window in self.windows().items())

    def long_prompts(self, prompts: list[str]) -> list[tuple[int, int]]:
        """(index, token count) of the prompts longer than ``context_window`` allows."""
        room = self.context_window()
        if room is None:
            return []
        lengths = prompt_lengths(self.base.tokenizer, prompts, self.base.chat_template, self.base.system_prompt)
        return [(i, n) for i, n in enumerate(lengths) if n > room]

    def encode(self, prompts: list[str]) -> Prompts:
        """Tokenise prompt texts into a left-padded batch that fits the context window with ``max_new_tokens`` after it.

        A longer prompt is refused or cut from the left, as ``sampling.long_prompts`` says. The cut drops the first tokens
        of the prompt's own text; BOS and the chat template's turn around it stay (the text is rendered again). The first
        cut warns; ``prompts_cut`` and ``last_cut`` count them.

        Raises:
            ValueError: with ``long_prompts='refuse'``, a prompt longer than ``context_window`` (``long_prompts_error``);
                with 'cut_left', a chat template and special tokens that alone take the whole room.
        """
        encoded, room = self.base.encode(prompts), self.context_window()
        self.last_cut = 0
        if room is None or encoded.ids.shape[1] <= room:
            return encoded
        lengths = encoded.mask.sum(-1).tolist()
        long = [i for i, n in enumerate(lengths) if n > room]
        if self.sampling.long_prompts == "refuse":
            raise ValueError(long_prompts_error([(i, lengths[i]) for i in long], prompts, room, self.sampling.max_new_tokens,
                                                "this batch", self.windows_text()))
        if not self.prompts_cut:
            warnings.warn(f"prompts longer than the {room} tokens that fit in the context window ({self.windows_text()}) before "
                          f"max_new_tokens={self.sampling.max_new_tokens} are cut from the left (sampling.long_prompts=cut_left): "
                          f"{len(long)} of this batch of {len(prompts)}; later ones are counted in train/prompts_cut and "
                          "val/prompts_cut, not warned about again", stacklevel=2)
        self.last_cut = len(long)
        self.prompts_cut += len(long)
        cut = list(prompts)
        for i in long:
            cut[i] = self.cut_left(prompts[i], room)
        return self.base.encode(cut)

    def cut_left(self, prompt: str, room: int) -> str:
        """``prompt`` without as many of its first tokens as it takes for it, as ``base.encode`` renders it (BOS, chat
        template), to have at most ``room`` tokens."""
        tokenizer, chat, system = self.base.tokenizer, self.base.chat_template, self.base.system_prompt
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        keep = len(ids) - (prompt_lengths(tokenizer, [prompt], chat, system)[0] - room)
        while keep > 0:  # decoding and re-encoding a cut can merge or split a token at its edge: check, and cut one more
            text = tokenizer.decode(ids[-keep:])
            if prompt_lengths(tokenizer, [text], chat, system)[0] <= room:
                return text
            keep -= 1
        raise ValueError(f"the chat template and special tokens around a prompt alone take more than the {room} tokens that fit "
                         f"in the context window ({self.windows_text()}) before max_new_tokens={self.sampling.max_new_tokens}: "
                         "lower --model.sampling.max_new_tokens, or shorten the system prompt")

    def distribution(self, base_logprobs: Tensor, adapter_logits: Optional[Tensor], step: Tensor | int) -> Tensor:
        """Log-probs of the tailored policy [..., V] at response position(s) ``step``: ``scores(...).log_softmax(-1)``."""
        return self.scores(base_logprobs, adapter_logits, step).log_softmax(-1)

    def scores(self, base_logprobs: Tensor, adapter_logits: Optional[Tensor], step: Tensor | int) -> Tensor:
        """Unnormalised log-probs of the tailored policy [..., V] at response position(s) ``step`` (int or [...]).

        ``(base_logprobs + α·adapter_logits) / temperature``, in that order (``distribution`` is their log_softmax): the product of experts, with
        tokens that are never sampled (padding) and the stop tokens before ``min_new_tokens`` set to −inf first.
        ``adapter_logits=None`` is the base alone: ``log_softmax(base_logprobs / temperature)`` with the same bans, the
        reference of the KL.

        Args:
            base_logprobs: [..., V] the base's log-probs over the vocabulary (−inf outside a top-k base's support).
            adapter_logits: [..., V] the adapter's output head, or None.
            step: Response position(s) of the rows: an int, or [...] one per row.

        Returns:
            [..., V] float32 scores (−inf where banned or outside the base's support).

        Where these bans leave no token of the base's support (a top-k base whose only tokens are stop tokens before
        ``min_new_tokens``, or padding), they give way, in turn, for that row: first the ban on stopping early, then
        the ban on padding. The policy is then the base's support itself: never empty, never NaN.
        """
        early = torch.as_tensor(step, device=base_logprobs.device) < self.sampling.min_new_tokens
        scores = product_of_experts(base_logprobs, adapter_logits, self.alpha, self.never_sampled, self.stops, early, self.base.full_support)
        return scores / self.sampling.temperature

    def ended(self, response_ids: Tensor, response_mask: Tensor) -> Tensor:
        """[B] whether each response ended with a stop token (rather than at ``max_new_tokens``)."""
        last = (response_mask.sum(-1) - 1).clamp(min=0)
        return self.stops[response_ids.gather(-1, last[:, None]).squeeze(-1)] & response_mask.any(-1)

    def decode(self, response_ids: Tensor, response_mask: Tensor) -> list[str]:
        """Response texts [B] of the generated tokens, special tokens dropped (as rewards see them): a stop token shows in
        the text unless it is a special token (EOS, an end of turn), as vLLM's ``stop_token_ids`` and HF ``generate`` +
        ``decode(skip_special_tokens=True)`` give it (e.g. ``stop_tokens=["."]`` keeps the final ".")."""
        return [self.base.tokenizer.decode(ids[real], skip_special_tokens=True) for ids, real in zip(response_ids, response_mask.bool())]

    def rollout_memory(self, rows: int, memory: RolloutMemory = "auto") -> RolloutMemory:
        """How a rollout of ``rows`` samples keeps the base's distributions for the update (``Rollout.base_distribution``).

        'full': float32 [B, T, V], B·T·V·4 bytes (exact; a Llama-3 vocabulary of 128,256 at 512 × 128 is 34 GB);
        'bfloat16': half that, rounded to bfloat16 (the loss's π and KL then differ in the 3rd significant digit);
        'top_k': the base's k finite log-probs and their ids [B, T, k], B·T·k·12 bytes (exact, for a base whose support
        is top-k: ``LocalBase(top_k=…)``, an API base; refused otherwise); 'recompute': nothing kept, the base reads
        each minibatch's prompt + response again just before its update (``read``: one teacher-forced forward per
        minibatch and epoch; the update then holds one minibatch's [m, T, V]; exact up to float rounding, which for a
        bfloat16 base is not small: warned); 'auto': 'top_k' for a top-k base, else 'full' while it takes at most
        ``ROLLOUT_MEMORY_BUDGET`` (4 GiB, counting ``max_new_tokens`` positions), else 'recompute'.

        Raises:
            ValueError: 'top_k' for a base with a full vocabulary, or an unknown mode.
        """
        if memory not in get_args(RolloutMemory):
            raise ValueError(f"unknown rollout_memory {memory!r}; choose one of {list(get_args(RolloutMemory))}")
        k = self.base.support_size
        if memory == "top_k" and k is None:
            raise ValueError("rollout_memory='top_k' keeps the base's top-k log-probs, exact only for a base whose support is "
                             "top-k (LocalBase top_k, an API base); this base has the whole vocabulary: use 'full', "
                             "'bfloat16' or 'recompute'")
        if memory == "auto":
            full = rows * self.sampling.max_new_tokens * self.base.vocab_size * 4
            memory = "top_k" if k is not None else "full" if full <= ROLLOUT_MEMORY_BUDGET else "recompute"
        if memory == "recompute" and self.base.dtype != torch.float32:
            warnings.warn(
                f"rollout_memory='recompute' with a {str(self.base.dtype).removeprefix('torch.')} base: the update's "
                "teacher-forced read rounds differently from the sampling pass (measured in bfloat16: log π of a sampled token "
                "off by up to 0.04 nats, and a top-k support that changes at 3% of positions), so the policy ratio starts away "
                "from 1; for exact updates use a float32 base (dtype: float32), or rollout_memory 'full', 'bfloat16' or 'top_k'"
            )
        return memory

    def decoding(self, device: torch.device) -> Literal["eager", "static", "compiled"]:
        """The decoding mode on ``device``: ``sampling.decoding``, 'auto' being 'compiled' on CUDA and 'eager' elsewhere."""
        if self.sampling.decoding != "auto":
            return self.sampling.decoding
        return "compiled" if device.type == "cuda" else "eager"

    def step_body(self, body: torch.nn.Module) -> Callable:
        """``body`` (a transformer without its head) compiled for one-token steps on a static cache: fullgraph, CUDA
        graphs on CUDA ("reduce-overhead"). Its weights are read at each call, so the adapter's updates show.

        Shapes: the first (rows, cache length) is compiled as is; a second makes those sizes dynamic (dynamo's automatic
        dynamic shapes), so later rollouts, evaluation batches and last batches reuse that graph (CUDA graphs are still
        recorded per shape). Every transformers model's forward shares one wrapper function, whose compiled entries
        dynamo caps at ``recompile_limit`` (8) for all of them together, with a hard error under fullgraph: calls here
        raise that cap to ``STEP_RECOMPILE_LIMIT``."""
        if id(body) not in self.compiled:
            mode = "reduce-overhead" if body.device.type == "cuda" else "default"
            compiled = torch.compile(body, mode=mode, fullgraph=True)

            def step(*args, **kwargs):
                with torch._dynamo.config.patch(recompile_limit=max(STEP_RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
                    return compiled(*args, **kwargs)

            self.compiled[id(body)] = step
        return self.compiled[id(body)]

    @torch.no_grad()
    def sample(self, prompts: Prompts, generator: Optional[torch.Generator] = None, samples_per_prompt: int = 1,
               top_p: Optional[float] = None, memory: RolloutMemory = "auto") -> Rollout:
        """Training rollouts: ``samples_per_prompt`` = k responses per prompt from the tailored policy, with what the
        update reads from this pass (``Rollout``: log-probs under π and the base, the exact KL, the base's distributions
        and the adapter's hidden states), so that the base runs once per generated token and never again on them.

        Args:
            prompts: [N, P] left-padded (``encode``); each is read once and its caches copied to k consecutive rows.
            generator: Random generator of the draws (None: torch's global one).
            samples_per_prompt: k.
            top_p: Nucleus mass of this call (None: ``sampling.top_p``).
            memory: How the base's distributions are kept (``rollout_memory``).

        Returns:
            ``Rollout`` of B = N·k rows; an adapter with control codes samples with code 0 (``Adapter.add_controls``). A
            policy without an adapter samples the base alone (KL 0, hidden states [B, T, 0]).
        """
        memory = self.rollout_memory(len(prompts.ids) * samples_per_prompt, memory)
        return Rollout(**self._decode(prompts, generator, samples_per_prompt, top_p, self.adapter is not None, record=memory))

    @torch.no_grad()
    def generate(self, prompts: Prompts, generator: Optional[torch.Generator] = None, samples_per_prompt: int = 1,
                 use_adapter: bool = True) -> Responses:
        """Responses to show or measure (evaluation, predict, distillation): from the policy ``sample`` draws from, tokens
        only, each drawn as transformers' ``generate`` draws (``Truncated.sample``): with a generator in the state
        ``torch.manual_seed(s)`` leaves the global one, the tailored policy draws the tokens ``generate`` draws after
        ``torch.manual_seed(s)`` with ``AdapterLogitsProcessor``, and the base alone those it draws with the processor at
        α = 0 (the policy's bans: a dedicated padding token, stops before ``min_new_tokens``; float32, see README).

        Args:
            prompts: [N, P] left-padded (``encode``).
            generator: Random generator of the draws (None: torch's global one).
            samples_per_prompt: k responses per prompt, in consecutive rows.
            use_adapter: False: the base alone (with the same decoding settings), e.g. the baseline or a teacher; a
                policy without an adapter always samples the base alone.

        Returns:
            ``Responses`` of B = N·k rows.
        """
        return Responses(**self._decode(prompts, generator, samples_per_prompt, None, use_adapter and self.adapter is not None, record=None))

    def _decode(self, prompts: Prompts, generator: Optional[torch.Generator], k: int, top_p: Optional[float], use_adapter: bool,
                record: Optional[RolloutMemory]) -> dict[str, Optional[Tensor]]:
        """The lockstep sampler behind ``sample`` and ``generate``: base and adapter advance one token at a time with
        their KV caches. Returns their fields by name ([B, ...] tensors stacked along T); ``record`` keeps the training
        ones, the base's distributions as that mode says (``rollout_memory``; None: tokens only)."""
        s = self.sampling
        top_p = s.top_p if top_p is None else top_p
        decoding = self.decoding(prompts.ids.device)
        if decoding != "eager" and k > 1:  # a static cache reads each row's prompt: its buffers keep one address (CUDA graphs)
            prompts, k = Prompts(prompts.ids.repeat_interleave(k, dim=0), prompts.mask.repeat_interleave(k, dim=0)), 1
        rows, width = len(prompts.ids) * k, prompts.ids.shape[1]
        base_static, adapter_static = decoding != "eager" and isinstance(self.base, LocalBase), decoding != "eager" and use_adapter
        cache_width = -(-(width + s.max_new_tokens) // STATIC_CACHE_BLOCK) * STATIC_CACHE_BLOCK
        base_body = self.step_body(self.base.lm.base_model) if base_static and decoding == "compiled" else None
        positions = position_ids(prompts.mask)
        base_cache = StaticCache(config=self.base.lm.config, max_cache_len=cache_width) if base_static else None
        base_lp, base_cache = self.base(prompts.ids, prompts.mask, positions, base_cache)
        base_lp = base_lp.repeat_interleave(k, dim=0)
        if k > 1:
            base_cache.batch_repeat_interleave(k)
        base_step = self.base if base_body is None else partial(self.base, body=base_body)
        adapter_cache, adapter_body, control, hidden = None, None, None, None
        if use_adapter:
            control = self.adapter.sampling_control(len(prompts.ids), prompts.ids.device)
            if adapter_static:  # a control-code prefix takes one more slot
                adapter_cache = StaticCache(config=self.adapter.body.config, max_cache_len=cache_width + self.adapter.prefix_length)
                adapter_body = self.step_body(self.adapter.body) if decoding == "compiled" else None
            hidden, adapter_cache = self.adapter(prompts.ids, prompts.mask, positions, adapter_cache, use_cache=True, control=control)
            hidden = hidden[:, -1].repeat_interleave(k, dim=0)
            if k > 1:
                adapter_cache.batch_repeat_interleave(k)
            control = None if control is None else control.repeat_interleave(k)
        prompts = Prompts(prompts.ids.repeat_interleave(k, dim=0), prompts.mask.repeat_interleave(k, dim=0))
        # the attention mask of prompt + response, pre-allocated: a static cache reads all of it, a dynamic one what is written
        mask = torch.cat([prompts.mask, prompts.mask.new_zeros(rows, cache_width - width)], dim=1)
        next_position = positions[:, -1].repeat_interleave(k, dim=0)
        alive = torch.ones(rows, dtype=torch.bool, device=mask.device)
        fields = ("response_ids", "response_mask", "logprobs", "ref_logprobs", "kl", "base_distribution", "base_support", "hidden")
        steps: dict[str, list[Tensor]] = {name: [] for name in fields}
        support: list[Tensor] = []  # top_k: the most finite log-probs of the base at each step
        for t in range(s.max_new_tokens):
            logprobs = self.distribution(base_lp, self.adapter.head(hidden) if use_adapter else None, t)  # [B, V] the tailored policy π
            real = alive  # rows still generating; finished rows get padding
            # π after top-k/top-p; evaluation draws as transformers' generate does (``Truncated.sample``), rollouts among the candidates
            kept = truncate(logprobs, s.top_k, top_p, s.min_tokens_to_keep)
            token = kept.sample(generator, None if record else logprobs.shape[-1]).masked_fill(~real, self.pad_id)
            steps["response_ids"].append(token)
            steps["response_mask"].append(real.long())
            if record:
                ref_logprobs = self.distribution(base_lp, None, t) if use_adapter else logprobs  # [B, V] the base alone, the reference
                steps["logprobs"].append(_pick(logprobs, token, real))
                steps["ref_logprobs"].append(_pick(ref_logprobs, token, real))
                steps["kl"].append(kl_divergence(logprobs, ref_logprobs).masked_fill(~real, 0.0) if use_adapter else torch.zeros_like(base_lp[:, 0]))
                if record == "top_k":
                    support.append((base_lp.isfinite() & real[:, None]).sum(-1).max())  # rows still generating; checked after the loop
                    values, ids = base_lp.topk(self.base.support_size, dim=-1)  # every finite log-prob of a top-k base
                    steps["base_distribution"].append(values)
                    steps["base_support"].append(ids)
                elif record != "recompute":
                    steps["base_distribution"].append(base_lp.to(torch.bfloat16) if record == "bfloat16" else base_lp)
                steps["hidden"].append(hidden if use_adapter else base_lp.new_zeros(len(token), 0))
            alive = real & ~self.stops[token]
            if t == s.max_new_tokens - 1 or not alive.any():
                break
            # feed the sampled token to both models: one base forward per generated token
            mask[:, width + t] = real.long()
            next_position = next_position + 1
            if decoding == "compiled" and mask.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are no longer read
            written = mask[:, : width + t + 1]
            base_lp, base_cache = base_step(token[:, None], mask if base_static else written, next_position[:, None], base_cache)
            if use_adapter:
                hidden, adapter_cache = self.adapter(token[:, None], mask if adapter_static else written, next_position[:, None], adapter_cache,
                                                     use_cache=True, control=control, body=adapter_body)
                hidden = hidden[:, -1] if adapter_body is None else hidden[:, -1].clone()  # a CUDA graph reuses its output's memory
        if support and int(torch.stack(support).max()) > self.base.support_size:  # some were not kept: refuse rather than cut
            raise ValueError(f"the base gave more than its support_size={self.base.support_size} finite log-probs at a step: "
                             "rollout_memory='top_k' would drop some; use 'full' or 'recompute'")
        stacked = {name: torch.stack(values, dim=1) for name, values in steps.items() if values}
        if record is not None:
            stacked.setdefault("base_distribution", None)  # 'recompute': read before each minibatch's update
        return {"prompt_ids": prompts.ids, "prompt_mask": prompts.mask, **stacked, "control": control}

    @torch.no_grad()
    def read(self, samples: Union[Rollout, Responses]) -> Union[Rollout, Responses]:
        """``samples`` with the base's distributions at each response position (``base_distribution`` [B, T, V] float32,
        dense): one teacher-forced pass of the base over prompt + response, no generation. For responses whose
        distributions no sampling pass kept: Quark's replays, rollouts sampled with ``rollout_memory='recompute'``."""
        ids, mask = sequence(samples)
        base_distribution = self.base.response_logprobs(ids, mask, samples.prompt_ids.shape[1])
        return samples._replace(base_distribution=base_distribution, base_support=None)

    def forward(self, samples: Union[Rollout, Responses], with_kl: bool = False) -> PolicyOutput:
        """The tailored policy on given responses, with gradients through the adapter: what a loss reads. The base does
        not run: its distributions come with the samples (a ``Rollout`` from sampling, ``Responses`` from ``read``).
        The output head and the combination run on real response tokens only, never on padding, a block of tokens at
        a time.

        Args:
            samples: [B] rows of prompts and responses, with the control code each was trained under (if any).
            with_kl: Also the exact per-token KL(π ‖ base) of the full distributions (``PolicyOutput.kl``).

        Returns:
            ``PolicyOutput``: log π of each response token, entropy (nats), hidden states [B, T, H], and the KL if
            asked for, each [B, T] and 0 on padding.

        Raises:
            ValueError: ``Responses`` that the base has not read (``read``).
        """
        if samples.base_distribution is None:
            raise ValueError("these samples have not been read by the base: pass TailoredPolicy.read(samples)")
        ids, mask = sequence(samples)
        prompt_len, response_len = samples.prompt_ids.shape[1], samples.response_ids.shape[1]
        hidden, _ = self.adapter(ids, mask, position_ids(mask), control=samples.control)
        hidden = hidden[:, prompt_len - 1 : prompt_len + response_len - 1]  # [B, T, H] states that chose each token
        real = samples.response_mask.bool()  # [B, T]
        rows, steps = real.nonzero(as_tuple=True)  # [N] each
        token_lps, entropies, kls = [], [], []
        chunk = max(1, EVALUATE_BLOCK // self.base.vocab_size)
        for r, t in zip(rows.split(chunk), steps.split(chunk)):
            base_lp = self._base_rows(samples, r, t)
            scores = self.scores(base_lp, self.adapter.head(hidden[r, t]), t)  # [n, V]
            ref_logprobs = self.distribution(base_lp, None, t) if with_kl else None
            token_lp, entropy, kl = TokenStats.apply(scores, samples.response_ids[r, t], ref_logprobs)
            token_lps.append(token_lp), entropies.append(entropy), kls.append(kl)
        kl = _unpack(torch.cat(kls), real) if with_kl else None
        return PolicyOutput(*(_unpack(torch.cat(x), real) for x in (token_lps, entropies)), hidden, kl)

    def _base_rows(self, samples: Union[Rollout, Responses], rows: Tensor, steps: Tensor) -> Tensor:
        """The base's log-probs [n, V] float32 at positions (``rows``, ``steps``) [n], as kept: dense, or top-k values
        scattered over −inf."""
        values = samples.base_distribution[rows, steps].float()
        if samples.base_support is None:
            return values
        dense = values.new_full((len(rows), self.base.vocab_size), float("-inf"))
        return dense.scatter(-1, samples.base_support[rows, steps], values)


def _unpack(values: Tensor, real: Tensor) -> Tensor:
    """Values [N] of the real tokens back into a [B, T] grid, 0 on padding."""
    return values.new_zeros(real.shape).masked_scatter(real, values)
