"""A black-box base: a model behind an OpenAI-compatible completions endpoint that returns top-k log-probs."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from .bases import encode_prompts, load_tokenizer, resolve_pretrained
from .types import Prompts



def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte → that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]  # the others map to 256, 257, ... in byte order
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


BYTE_DECODER = byte_level_alphabet()
T = TypeVar("T")


def piece_bytes(piece: str) -> bytes:
    """The bytes a vocabulary piece stands for: byte-level BPE symbols, or SentencePiece's <0xNN> and ▁ pieces."""
    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        return bytes([int(piece[3:5], 16)])
    if all(char in BYTE_DECODER for char in piece):
        return bytes(BYTE_DECODER[char] for char in piece)
    return piece.replace("▁", " ").encode()


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """The bytes each token id stands for (special tokens: their text)."""
    special = set(tokenizer.all_special_tokens)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [piece.encode() if piece in special else piece_bytes(piece) for piece in pieces]


def remote_token_bytes(token: str) -> bytes:
    """The bytes of a token string as APIs return it: its text, or ``bytes:\\xNN...`` where that is not valid UTF-8."""
    if token.startswith("bytes:"):
        return bytes(int(hex_byte, 16) for hex_byte in re.findall(r"\\x([0-9a-fA-F]{2})", token))
    return token.encode()


class RemoteCache:
    """What a remote base remembers of each row between steps: its tokens so far (the server holds no state)."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def batch_repeat_interleave(self, k: int) -> None:
        self.rows = [list(row) for row in self.rows for _ in range(k)]


class RemoteBase(nn.Module):
    """The base policy behind an OpenAI-compatible ``/completions`` endpoint (vLLM, TGI, llama.cpp, OpenAI).

    Each decoding step sends one request per unfinished row (concurrently), ``max_tokens=1`` and
    ``logprobs=top_logprobs``, with the row's token ids as the prompt; the returned token strings are
    mapped to ids through the tokenizer's bytes (byte tokens included). The base's log-probs are its
    top-k and -inf elsewhere, so the tailored policy lives on that support in sampling, in the loss and
    in evaluation alike (train with ``LocalBase(top_k=...)`` for the same support). Tokens that map to
    no id are dropped and counted (``unmapped_tokens``). The API key is read from the environment at
    each request and kept nowhere else.
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
        max_concurrency: int = 32,
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
            max_concurrency: Requests in flight at once.
        """
        super().__init__()
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.path = None  # no local weights: the adapter needs its own checkpoint
        self.tokenizer = load_tokenizer(resolve_pretrained(tokenizer))
        self.top_logprobs = top_logprobs
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.api_key_env = api_key_env
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.pool = ThreadPoolExecutor(max_concurrency)
        self.ids = {}  # token bytes → id (the first id of any bytes shared by several)
        for token_id, raw in enumerate(token_bytes(self.tokenizer)):
            self.ids.setdefault(raw, token_id)
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

    def train(self, mode: bool = True) -> "RemoteBase":
        return super().train(False)

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
        for i, top in zip(rows, self.pool.map(self.top_logprobs_of, [cache.rows[i] for i in rows])):
            logprobs[i] = float("-inf")
            for token_id, value in top.items():
                logprobs[i, token_id] = value
        return logprobs.to(self.anchor.device), cache

    def response_logprobs(self, ids: Tensor, mask: Tensor, prompt_length: int) -> Tensor:
        raise NotImplementedError(
            "a RemoteBase cannot re-read stored responses (Quark's data pool): train with RLOO or PPO, or against a "
            "local proxy of the remote model (python -m lightning_ipa distill) and use the RemoteBase in test/predict"
        )

    def top_logprobs_of(self, tokens: list[int]) -> dict[int, float]:
        """{token id: log-prob} of the next token after ``tokens``: one request."""
        body = {"model": self.model, "prompt": tokens, "max_tokens": 1, "logprobs": self.top_logprobs, "temperature": 1.0}
        out = {}
        for raw, value in self.post(body, parse_top_logprobs):
            if raw in self.ids:
                out[self.ids[raw]] = value
            else:
                with self.lock:
                    self.unmapped_tokens += 1
        return out

    def post(self, body: dict[str, Any], parse: Callable[[Any], T]) -> T:
        """``parse`` of the endpoint's JSON reply; timeouts, HTTP 429/5xx and malformed replies are retried with backoff."""
        headers = {"Content-Type": "application/json"}
        if self.api_key_env and (key := os.environ.get(self.api_key_env)):
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        failure = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, data, headers), timeout=self.timeout) as response:
                    return parse(json.loads(response.read()))
            except urllib.error.HTTPError as error:
                detail = error.read()[:200].decode(errors="replace")
                if error.code != 429 and error.code < 500:
                    raise RuntimeError(f"RemoteBase: {self.url} answered HTTP {error.code}: {detail}") from None
                failure = f"HTTP {error.code}: {detail}"
            except (TimeoutError, urllib.error.URLError) as error:
                failure = f"no reply within {self.timeout} s" if isinstance(getattr(error, "reason", error), TimeoutError) else str(error)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
                failure = f"malformed reply ({type(error).__name__}: {error})"
            finally:
                with self.lock:
                    self.requests += 1
                    self.request_seconds += time.perf_counter() - start
        raise RuntimeError(f"RemoteBase: {self.url} failed {self.max_retries + 1} times; last: {failure}")


def parse_top_logprobs(reply: Any) -> list[tuple[bytes, float]]:
    """(token bytes, log-prob) of the completions schema's ``choices[0].logprobs.top_logprobs[0]``."""
    return [(remote_token_bytes(token), float(value)) for token, value in reply["choices"][0]["logprobs"]["top_logprobs"][0].items()]
