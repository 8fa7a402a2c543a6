"""A black-box base: a model behind an OpenAI-compatible completions endpoint that returns top-k log-probs."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, TypeVar

import httpx
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from .bases import (
    StopTokens, encode_prompts, load_tokenizer, pad_with_a_stop_token, read_generation_config, resolve_pretrained, stop_ids,
)
from .frozen import Frozen
from .types import Prompts


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte → that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]  # the others map to 256, 257, ... in byte order
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


BYTE_DECODER = byte_level_alphabet()
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces
T = TypeVar("T")


def decoder_steps(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """The types of the steps of the tokenizer's ``tokenizers`` decoder, e.g. {"ByteLevel"} or {"Replace", "ByteFallback", "Fuse"}."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return set()
    config = json.loads(backend.decoder.__getstate__())
    return {step["type"] for step in config.get("decoders", [config])}


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """The bytes each token id adds to a text, as the tokenizer's own decoder writes them.

    Each piece is decoded (``convert_tokens_to_string``) after an anchor, the tokens of "a", whose text is then cut off:
    so a SentencePiece piece keeps the space its "▁" stands for, which decoders drop at the start of a text (vLLM
    restores it too, vllm-project/vllm#48674, and decodes byte-fallback tokens after context, #34875). Where that text
    is not whole (U+FFFD: part of a multi-byte character), the bytes come from the piece as the decoder reads it: the
    GPT-2 byte alphabet for a ByteLevel decoder (byte-level BPE, tiktoken-style vocabularies), the byte of a ``<0xNN>``
    piece for a ByteFallback one (Llama-2, Mistral, Gemma). Special and added tokens give their text.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    anchor = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
    start = len(tokenizer.convert_tokens_to_string(anchor))
    steps = decoder_steps(tokenizer)
    out = []
    for piece in pieces:
        text = tokenizer.convert_tokens_to_string(anchor + [piece])[start:]
        if "\ufffd" in text and "ByteLevel" in steps and all(char in BYTE_DECODER for char in piece):
            out.append(bytes(BYTE_DECODER[char] for char in piece))
        elif "\ufffd" in text and "ByteFallback" in steps and (byte := BYTE_PIECE.fullmatch(piece)):
            out.append(bytes([int(byte[1], 16)]))
        else:
            out.append(text.encode())
    return out


def token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[bytes, int]:
    """Token bytes → id: the inverse of ``token_bytes``.

    Ids whose bytes are equal cannot be told apart by a token string: a SentencePiece byte-fallback piece and the
    piece that spells its byte (``<0x2C>`` and ``,``, ``<0x20>`` and ``▁``). The bytes then map to the piece that spells
    them, the one the tokenizer's encoder produces (it falls back to bytes only for characters no piece spells); among
    other ids with equal bytes, to the lowest id.
    """
    ids: dict[bytes, int] = {}
    for token_id, raw in enumerate(token_bytes(tokenizer)):
        if raw not in ids or BYTE_PIECE.fullmatch(tokenizer.convert_ids_to_tokens(ids[raw])):  # a byte-fallback piece yields
            ids[raw] = token_id
    return ids


def token_name(raw: bytes) -> str:
    """How the OpenAI completions API names a token: its text, or ``bytes:\\xNN...`` where its bytes alone are not valid UTF-8."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def remote_token_bytes(token: str) -> bytes:
    """The bytes of a token string as APIs return it (the inverse of ``token_name``)."""
    if token.startswith("bytes:"):
        return bytes(int(hex_byte, 16) for hex_byte in re.findall(r"\\x([0-9a-fA-F]{2})", token))
    return token.encode()


class RemoteCache:
    """What a remote base remembers of each row between steps: its tokens so far (the server holds no state)."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def batch_repeat_interleave(self, k: int) -> None:
        self.rows = [list(row) for row in self.rows for _ in range(k)]


class RemoteBase(Frozen):
    """The base policy behind an OpenAI-compatible ``/completions`` endpoint (vLLM, TGI, llama.cpp, OpenAI).

    Each decoding step sends one request for all unfinished rows: the completions API's list of prompts, each a row's
    token ids, ``max_tokens=1`` and ``logprobs=top_logprobs``; a serving engine (vLLM, SGLang, TGI) batches them and
    reuses the rows' shared prefixes. ``rows_per_request`` splits a step into several requests, sent concurrently
    (``rows_per_request=1`` is one request per row). One HTTP client (httpx) keeps its connections open across requests.
    Choice ``i`` of a reply (by its ``index``) answers prompt ``i``. The returned token strings are
    mapped to ids through the bytes the tokenizer's own decoder gives each id (``token_ids``): the text, with the
    leading space of SentencePiece's "▁" pieces, or OpenAI's ``bytes:\\xNN...`` where a token alone is not valid
    UTF-8. The base's log-probs are its top-k and -inf elsewhere, so the tailored policy lives on that support in
    sampling, in the loss and in evaluation alike (train with ``LocalBase(top_k=...)`` for the same support). A
    reply with more than k entries (vLLM adds the sampled token when it is not among the top k; the OpenAI
    contract allows ``logprobs + 1``) gives its k highest (ties: the first in the reply). Tokens that map to
    no id are dropped and counted (``unmapped_tokens``). The API key is read from the environment at
    each request and kept nowhere else.

    The legacy completions schema keys ``top_logprobs`` by token string, so ids with equal strings (a
    byte-fallback piece and the piece that spells its byte) reach the client as one entry: the server keeps one
    value (vLLM the last in rank order, ``CompletionsServer`` the first), mapped to the piece (``token_ids``).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer: str,
        top_logprobs: int = 20,
        chat_template: bool = False,
        system_prompt: Optional[str] = None,
        api_key_env: Optional[str] = "OPENAI_API_KEY",
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        rows_per_request: Optional[int] = None,
        max_concurrency: int = 8,
        stop_tokens: Optional[StopTokens] = None,
        context_window: Optional[int] = None,
    ):
        """
        Args:
            base_url: The API root, e.g. ``http://localhost:8000/v1`` (``/completions`` is appended).
            model: The served model's name.
            tokenizer: The served model's tokenizer (hub name or folder); the adapter must share it.
            top_logprobs: k, the log-probs per step the endpoint returns (OpenAI allows at most 5, vLLM any).
            chat_template: Wrap each prompt as a user turn of the tokenizer's chat template.
            system_prompt: System turn for the chat template (None: the template's default).
            api_key_env: Environment variable holding the API key (sent as a Bearer token); None: no key.
            timeout: Seconds per request.
            max_retries: Retries of a request that timed out, got HTTP 429/5xx or malformed JSON.
            backoff: Seconds before the first retry; doubled at each further one.
            rows_per_request: Prompts per request (None: all unfinished rows of a step in one). Set it to the server's
                limit on the prompts of one request, if it has one.
            max_concurrency: Requests in flight at once (and HTTP connections kept open) when a step needs several.
            stop_tokens: The tokens that end a response (ids or token strings; digits are ids); None: the model's own (``stop_ids``:
                the tokenizer's EOS, the ``eos_token_id`` of a ``generation_config.json`` beside it, the chat
                template's end of turn). Set it to what the server stops on when its tokenizer folder lacks them.
            context_window: The served model's context length in tokens (vLLM's ``max_model_len``), so that long
                prompts are refused or cut before a request (``Sampling.long_prompts``); None: unchecked (the server
                refuses what it cannot read).
        """
        super().__init__()
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.path = None  # no local weights: the adapter needs its own checkpoint
        path = resolve_pretrained(tokenizer)
        self.tokenizer = load_tokenizer(path)
        self.stop_ids = stop_ids(self.tokenizer, read_generation_config(path), chat_template, stop_tokens, self.vocab_size, system_prompt)
        pad_with_a_stop_token(self.tokenizer, self.stop_ids)
        self.max_positions = context_window
        self.top_logprobs = top_logprobs
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.api_key_env = api_key_env
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        if rows_per_request is not None and rows_per_request < 1:
            raise ValueError(f"RemoteBase: rows_per_request={rows_per_request}: give a positive number of prompts per request, or None for all")
        self.rows_per_request = rows_per_request
        self.client = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency))
        self.pool = ThreadPoolExecutor(max_concurrency)
        self.ids = token_ids(self.tokenizer)  # token bytes → id
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows the module's device
        self.lock = threading.Lock()
        self.forward_count = 0
        self.requests = 0
        self.unmapped_tokens = 0
        self.request_seconds = 0.0  # summed over requests (they overlap when concurrent)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def full_support(self) -> bool:
        """False: an API returns its top-k log-probs only."""
        return False

    @property
    def support_size(self) -> Optional[int]:
        """The most tokens with a finite log-prob at a step: the ``top_logprobs`` the API returns."""
        return self.top_logprobs

    def encode(self, prompts: list[str]) -> Prompts:
        """Tokenise prompt texts into a left-padded batch on the module's device."""
        return encode_prompts(self.tokenizer, prompts, self.chat_template, self.system_prompt, self.anchor.device)

    @torch.no_grad()
    def forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Optional[RemoteCache] = None) -> tuple[Tensor, RemoteCache]:
        """Next-token log-probs [B, V]: the endpoint's top-k, -inf elsewhere (0 for finished rows, which sample padding).

        ``ids`` [B, L] are the new tokens (the left-padded prompts first, then one token per row);
        ``mask`` [B, past + L] marks the real ones.
        """
        self.forward_count += 1
        alive = mask[:, -1].bool().cpu()
        if cache is None:  # the prompts
            cache = RemoteCache([row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())])
        else:  # a step: the new token joins each unfinished row
            for row, token, real in zip(cache.rows, ids[:, 0].tolist(), alive.tolist()):
                if real:
                    row.append(token)
        logprobs = torch.zeros(len(cache.rows), self.vocab_size)
        rows = [i for i, real in enumerate(alive.tolist()) if real]
        for i, top in zip(rows, self.top_logprobs_of([cache.rows[i] for i in rows])):
            logprobs[i] = float("-inf")
            logprobs[i, list(top)] = torch.tensor(list(top.values()))
        return logprobs.to(self.anchor.device), cache

    def response_logprobs(self, ids: Tensor, mask: Tensor, prompt_length: int) -> Tensor:
        raise NotImplementedError(
            "a RemoteBase cannot re-read stored responses (Quark's data pool): train with RLOO or PPO, or against a "
            "local proxy of the remote model (python -m lightning_ipa distill) and use the RemoteBase in test/predict"
        )

    def top_logprobs_of(self, prompts: list[list[int]]) -> list[dict[int, float]]:
        """{token id: log-prob} of the next token after each prompt (token ids): one request per ``rows_per_request`` prompts.

        Raises:
            RuntimeError: no entry of a reply maps to a token id (the policy would have no support to sample from):
                the tokenizer is not the served model's, or the server names tokens in a way ``token_ids`` does not read.
        """
        if not prompts:
            return []
        size = self.rows_per_request or len(prompts)
        chunks = [prompts[start : start + size] for start in range(0, len(prompts), size)]
        replies = list(self.pool.map(self.request, chunks)) if len(chunks) > 1 else [self.request(chunks[0])]
        return [self.token_logprobs(entries) for reply in replies for entries in reply]

    def request(self, prompts: list[list[int]]) -> list[list[tuple[bytes, float]]]:
        """The top-k entries (token bytes, log-prob) the endpoint returns for each prompt: one request."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "logprobs": self.top_logprobs, "temperature": 1.0}
        return self.post(body, lambda reply: parse_top_logprobs(reply, len(prompts)))

    def token_logprobs(self, entries: list[tuple[bytes, float]]) -> dict[int, float]:
        """{token id: log-prob} of one reply's entries: its k highest (ties: the first in the reply), unmapped ones counted."""
        out, unmapped = {}, []
        ranked = sorted(entries, key=lambda entry: -entry[1])  # stable: ties keep the reply's order
        for raw, value in ranked[: self.top_logprobs]:  # the k highest: not a sampled token appended beyond them
            if raw in self.ids:
                out[self.ids[raw]] = value
            else:
                unmapped.append(raw)
        if unmapped:
            with self.lock:
                self.unmapped_tokens += len(unmapped)
        if not out:
            raise RuntimeError(
                f"RemoteBase: none of the {len(entries)} tokens {self.url} returned maps to an id of the tokenizer "
                f"{self.tokenizer.name_or_path} (e.g. {[raw.decode(errors='replace') for raw in unmapped[:5]]}): the policy would have "
                "nothing to sample. Give the served model's own tokenizer (tokenizer=...), and check how the server names tokens "
                "(text, or bytes:\\xNN)"
            )
        return out

    def post(self, body: dict[str, Any], parse: Callable[[Any], T]) -> T:
        """``parse`` of the endpoint's JSON reply; timeouts, connection errors, HTTP 429/5xx and malformed replies are
        retried with backoff (``max_retries`` times, ``backoff`` · 2^i seconds); other HTTP errors fail at once."""
        headers = {}
        if self.api_key_env and (key := os.environ.get(self.api_key_env)):
            headers["Authorization"] = f"Bearer {key}"
        failure = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            start = time.perf_counter()
            try:
                response = self.client.post(self.url, json=body, headers=headers)
                if response.status_code == 429 or response.status_code >= 500:
                    failure = f"HTTP {response.status_code}: {response.text[:200]}"
                    continue
                if response.is_error:
                    raise RuntimeError(f"RemoteBase: {self.url} answered HTTP {response.status_code}: {response.text[:200]}")
                return parse(response.json())
            except httpx.TimeoutException:
                failure = f"no reply within {self.timeout} s"
            except httpx.TransportError as error:  # refused, reset, DNS: the server may be restarting
                failure = f"{type(error).__name__}: {error}"
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
                failure = f"malformed reply ({type(error).__name__}: {error})"
            finally:
                with self.lock:
                    self.requests += 1
                    self.request_seconds += time.perf_counter() - start
        raise RuntimeError(f"RemoteBase: {self.url} failed {self.max_retries + 1} times; last: {failure}")


def parse_top_logprobs(reply: Any, prompts: int) -> list[list[tuple[bytes, float]]]:
    """(token bytes, log-prob) of each prompt's ``choices[i].logprobs.top_logprobs[0]`` in the completions schema,
    choice ``i`` being the one whose ``index`` is i (OpenAI and vLLM number a list of prompts' choices in prompt order;
    a server that leaves ``index`` out answers in order)."""
    choices = [{"index": i, **choice} for i, choice in enumerate(reply["choices"])]  # a reply without indices: in order
    choices.sort(key=lambda choice: choice["index"])
    if [choice["index"] for choice in choices] != list(range(prompts)):
        raise ValueError(f"{len(choices)} choices (indices {[choice['index'] for choice in choices][:8]}) for {prompts} prompts")
    return [[(remote_token_bytes(token), float(value)) for token, value in choice["logprobs"]["top_logprobs"][0].items()] for choice in choices]
