"""Rollout memory per ``rollout_memory`` mode: peak memory and seconds of one rollout and its update pass.

A randomly initialised Llama-shaped base with a Llama-3 vocabulary (128,256 tokens; no download) and a 1-layer adapter;
each mode runs in its own process, so that its peak RSS (CPU) or peak CUDA memory is its own. Prints seconds, peak
memory and the kept distributions' size per mode, with ratios to 'full'; writes the table to ``--output``.

    python benchmarks/rollout_memory.py --batch 32 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.conftest's in-process tokenizer
MODES = ("full", "bfloat16", "top_k", "recompute")


def build(folder: Path, vocab: int, hidden: int, layers: int) -> None:
    """A random Llama of the given shape, with the tests' in-process byte-level BPE tokenizer (its ids are the first
    few hundred of the ``vocab``), saved to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import train_tokenizer  # built in-process: no download

    tokenizer = train_tokenizer(400, ["<eos>", "<pad>"])
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_mode(args: argparse.Namespace) -> dict:
    """One mode in this process: sample a rollout, read it if needed, run the loss's pass with the exact KL."""
    import torch

    from lightning_ipa import Adapter, AdapterConfig, LocalBase, Sampling, TailoredPolicy

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = LocalBase(args.model, dtype="float32", top_k=args.top_k if args.mode == "top_k" else None).to(device)
    adapter = Adapter.build(AdapterConfig(num_layers=1), base).to(device)
    n = args.new_tokens
    policy = TailoredPolicy(base, adapter, sampling=Sampling(max_new_tokens=n, min_new_tokens=n)).to(device)
    prompts = policy.encode(["The quick brown fox jumps over the lazy dog"] * args.batch)
    start = time.perf_counter()
    rollout = policy.sample(prompts, torch.Generator(device).manual_seed(0), memory=args.mode)
    sampled = time.perf_counter()
    if rollout.base_distribution is None:
        rollout = policy.read(rollout)
    output = policy(rollout, with_kl=True)
    output.logprobs.sum().backward()
    done = time.perf_counter()
    kept = sum(t.numel() * t.element_size() for t in (rollout.base_distribution, rollout.base_support) if t is not None)
    if args.mode == "recompute":
        kept = 0  # read just before the update; nothing crosses from sampling to it
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": args.mode, "sample_s": sampled - start, "update_pass_s": done - sampled, "kept_bytes": kept, "peak_bytes": peak,
            "device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="samples per rollout (B)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per response (T)")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary size (V; Llama 3: 128,256)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random base")
    parser.add_argument("--layers", type=int, default=2, help="layers of the random base")
    parser.add_argument("--top-k", type=int, default=20, help="the base's support in the top_k mode (an API base's top_logprobs)")
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmark_memory" / "rollout_memory.json"), help="where the table is written (JSON)")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # a child: one mode
        print(json.dumps(run_mode(args)))
        return
    with tempfile.TemporaryDirectory() as folder:
        build(Path(folder), args.vocab, args.hidden, args.layers)
        rows = []
        for mode in MODES:
            child = [sys.executable, __file__, "--mode", mode, "--model", folder, *sys.argv[1:]]
            done = subprocess.run(child, capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    full = rows[0]
    print(f"\nB={args.batch} × T={args.new_tokens} × V={args.vocab}, top_k base support {args.top_k} (top_k mode only), "
          f"on {full['device']}; ratios to 'full'")
    print(f"{'mode':<10} {'sample s':>9} {'update pass s':>14} {'kept MB':>9} {'peak MB':>9} {'peak ratio':>11}")
    for row in rows:
        print(f"{row['mode']:<10} {row['sample_s']:>9.2f} {row['update_pass_s']:>14.2f} {row['kept_bytes'] / 2**20:>9.1f} "
              f"{row['peak_bytes'] / 2**20:>9.0f} {row['peak_bytes'] / full['peak_bytes']:>11.2f}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    from lightning_ipa.io import write_text_atomic

    write_text_atomic(out, json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
