"""A minimal OpenAI-compatible completions endpoint over a local causal LM (tests, benchmarks, offline trials).

``POST /v1/completions`` with ``{"prompt": [token ids], "logprobs": k}`` (or a list of such prompts) answers in the
legacy completions schema: ``choices[i].logprobs.top_logprobs[0]`` maps the k most likely tokens after prompt ``i`` to
their log-probs; a list of prompts is read in one batched forward (left-padded, with position ids), and, as serving
engines do (vLLM's automatic prefix caching), the KV cache of each prompt is kept so that a prompt that extends one by a
token reads only that token. A
token is named by the text it adds after other tokens (a SentencePiece "▁" piece with its leading space, as
vLLM names it), or ``bytes:\\xNN...`` where its bytes alone are not valid UTF-8, as OpenAI does.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .bases import DType, load_causal_lm, load_tokenizer, resolve_pretrained
from .remote import token_bytes, token_name
from .types import position_ids


class CompletionsServer:
    """Serves one model's next-token top-k log-probs on ``url`` from a background thread (a context manager).

    The reply's token is the most likely one; with ``add_sampled_token`` it is sampled (temperature 1) and, when it
    is not among the top k, added to them as entry k + 1, as vLLM does (the OpenAI contract allows ``logprobs + 1``).
    Ids with the same name (a byte-fallback piece and the piece that spells its byte) share one entry: the first's.

    ``prefix_cache`` prompts' KV caches are kept (least recently used first out): a prompt that is a kept one plus one
    token, as in token-by-token decoding, reads that token alone (for models whose every layer caches all positions; a
    sliding-window model reads whole prompts).
    """

    def __init__(
        self, name_or_path: str, host: str = "127.0.0.1", port: int = 0, dtype: DType = "float32", add_sampled_token: bool = False,
        prefix_cache: int = 256,
    ):
        path = resolve_pretrained(name_or_path)
        self.tokenizer = load_tokenizer(path)
        self.names = [token_name(raw) for raw in token_bytes(self.tokenizer)]
        self.lm = load_causal_lm(path, dtype).eval()
        self.add_sampled_token = add_sampled_token
        self.generator = torch.Generator().manual_seed(0)
        self.lock = threading.Lock()  # one forward at a time
        self.prefix_cache = prefix_cache if all(type(layer) is DynamicLayer for layer in DynamicCache(config=self.lm.config).layers) else 0
        self.prefixes: OrderedDict[tuple[int, ...], tuple[list[tuple[Tensor, Tensor]], Tensor]] = OrderedDict()  # prompt → its (K, V) per layer, last logits
        self.requests = 0
        self.connections = 0  # TCP connections accepted
        self.computed_tokens = 0  # prompt tokens the model read (the rest came from the prefix cache)
        self.compute_seconds = 0.0  # in the model's forward, summed over requests
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a client's connection serves many requests

            def setup(self) -> None:
                super().setup()
                with owner.lock:
                    owner.connections += 1

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                status, payload = owner.handle(self.path, dict(self.headers), self.rfile.read(length))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self.http = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "CompletionsServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.http.shutdown()
        self.http.server_close()

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        """(HTTP status, JSON payload) for one request."""
        if path.rstrip("/") != "/v1/completions":
            return HTTPStatus.NOT_FOUND, {"error": {"message": f"no route {path}"}}
        try:
            request = json.loads(body)
            prompts, k = request["prompt"], int(request.get("logprobs") or 1)
            if isinstance(prompts, list) and prompts and all(isinstance(i, int) for i in prompts):
                prompts = [prompts]  # one prompt
            if not (isinstance(prompts, list) and prompts and all(isinstance(p, list) and p and all(isinstance(i, int) for i in p) for p in prompts)):
                raise ValueError("prompt must be a non-empty list of token ids, or a list of them")
        except (ValueError, KeyError, TypeError) as error:
            return HTTPStatus.BAD_REQUEST, {"error": {"message": str(error)}}
        self.requests += 1
        return HTTPStatus.OK, self.complete(prompts, k)

    @torch.no_grad()
    def complete(self, prompts: list[list[int]], k: int) -> dict[str, Any]:
        """The reply to ``prompts`` (token ids each): one choice per prompt, from at most two batched forwards (the
        prompts that extend a cached one by a token, and the others)."""
        with self.lock:
            start = time.perf_counter()
            logits = self.next_token_logits(prompts)
            self.compute_seconds += time.perf_counter() - start
            logprobs = logits.float().log_softmax(-1).cpu()
            indices = logprobs.topk(k).indices.tolist()
            chosen = (torch.multinomial(logprobs.exp(), 1, generator=self.generator)[:, 0].tolist() if self.add_sampled_token
                      else [row[0] for row in indices])
        return {"object": "text_completion", "choices": [self.choice(i, row, top, token) for i, (row, top, token) in enumerate(zip(logprobs, indices, chosen))]}

    def next_token_logits(self, prompts: list[list[int]]) -> Tensor:
        """Logits [n, V] of the token after each prompt; prompts' KV caches are kept for the next request (``prefix_cache``)."""
        logits: list[Optional[Tensor]] = [None] * len(prompts)
        known = [i for i, p in enumerate(prompts) if tuple(p) in self.prefixes]  # asked again: the kept answer
        extend = [i for i, p in enumerate(prompts) if i not in known and tuple(p[:-1]) in self.prefixes]
        read = [i for i in range(len(prompts)) if i not in known and i not in extend]
        for i in known:
            logits[i] = self.prefixes[tuple(prompts[i])][1]
            self.prefixes.move_to_end(tuple(prompts[i]))
        for group, past in ((read, None), (extend, [self.prefixes[tuple(prompts[i][:-1])][0] for i in extend])):
            if group:
                for i, (kv, last) in zip(group, self.forward([prompts[i] for i in group], past)):
                    logits[i] = last
                    if self.prefix_cache:
                        self.prefixes[tuple(prompts[i])] = kv, last
        while len(self.prefixes) > self.prefix_cache:
            self.prefixes.popitem(last=False)
        return torch.stack(logits)

    def forward(self, prompts: list[list[int]], past: Optional[list[list[tuple[Tensor, Tensor]]]]) -> list[tuple[list[tuple[Tensor, Tensor]], Tensor]]:
        """One batched, left-padded forward: of whole prompts (``past`` None), or of each prompt's last token after its
        kept KV cache. Returns each prompt's (K, V) per layer ([1, heads, length, head dim], no padding) and next-token logits."""
        device = self.lm.device
        lengths = [len(p) for p in prompts]
        new = [1 if past is not None else n for n in lengths]  # tokens each row reads now
        width = max(lengths)
        ids = torch.zeros(len(prompts), max(new), dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, (prompt, n) in enumerate(zip(prompts, new)):  # left-padded: every row's next token is read at the last position
            ids[row, ids.shape[1] - n :], mask[row, width - len(prompt) :] = torch.tensor(prompt[-n:]), 1
        positions = position_ids(mask)[:, -ids.shape[1] :]
        cache = DynamicCache(config=self.lm.config)
        if past is not None:  # the rows' kept caches, left-padded to one length
            for layer in range(len(past[0])):
                keys, values = ([torch.nn.functional.pad(kv[layer][j], (0, 0, width - 1 - kv[layer][j].shape[2], 0)) for kv in past] for j in (0, 1))
                cache.update(torch.cat(keys), torch.cat(values), layer)
        self.computed_tokens += sum(new)
        out = self.lm(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), cache=cache,
                      use_cache=True, logits_to_keep=1)
        kept = [[(layer.keys[row : row + 1, :, width - n :], layer.values[row : row + 1, :, width - n :]) for layer in out.cache.layers]
                for row, n in enumerate(lengths)] if self.prefix_cache else [None] * len(prompts)
        return list(zip(kept, out.logits[:, -1]))

    def choice(self, index: int, logprobs: torch.Tensor, indices: list[int], chosen: int) -> dict[str, Any]:
        """Choice ``index`` of a reply: the chosen token and the top-k entries (the chosen one last when not among them)."""
        top: dict[str, float] = {}
        listed = [*indices, chosen]  # the chosen token last: a (k + 1)-th entry when not among the top k
        for token_id, value in zip(listed, logprobs[listed].tolist()):
            top.setdefault(self.token_string(token_id), value)
        name = self.token_string(chosen)
        logprobs_field = {"tokens": [name], "token_logprobs": [logprobs[chosen].item()], "top_logprobs": [top]}
        return {"index": index, "text": name, "finish_reason": "length", "logprobs": logprobs_field}

    def token_string(self, token_id: int) -> str:
        """How the API names a token (``token_bytes``, ``token_name``)."""
        return self.names[token_id]


def main() -> None:
    """``python -m lightning_ipa.serving --model NAME --port 8000``: serve a local model until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub name, folder, .gguf or package:// path")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--add-sampled-token", action="store_true",
                        help="sample the reply's token and add it to the top k when it is not among them, as vLLM does")
    parser.add_argument("--prefix-cache", type=int, default=256,
                        help="prompts whose KV caches are kept, so that a prompt extending one by a token reads one token (0: none)")
    args = parser.parse_args()
    with CompletionsServer(args.model, args.host, args.port, args.dtype, args.add_sampled_token, args.prefix_cache) as server:
        print(f"Serving {args.model} at {server.url}/completions (Ctrl-C to stop)", flush=True)
        try:
            server.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
