"""One RL step at the paper's shapes, per ``rollout_memory`` mode: seconds of sampling / reward / update, and peak memory.

Randomly initialised models of the shapes below (no download), the tests' in-process tokenizer (its ids are the first
few hundred of the vocabulary; the reward reads the sampled ids folded into them), and a random RoBERTa-base classifier
as the reward (the shape of Detoxify's, the paper's toxicity reward) through ``ClassifierReward``. Each mode runs in its
own process, so that its peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS) is its own. One step = ``sample``
(with the rollout's kept distributions, as the mode says) → reward → the updates, one per minibatch of
``--minibatch-size`` rows as ``IPAModule.update`` does them: ``read`` where the mode recomputes, the policy's forward
with the exact KL, backward, an AdamW step of the adapter.

Shapes (``--shape``; paper-scale ``--batch``/``--new-tokens`` defaults per shape):
- ``gpt2-large``: GPT-2 large base (774M, V = 50,257) + GPT-2 small adapter (124M): IPA's toxicity setting, 128 × 20;
- ``llama-3.2-1b``: a Llama-3.2-1B-shaped base (V = 128,256) + its first 2 layers as adapter, 512 × 128;
- ``llama-128k-tiny``: a 2-layer, 256-wide Llama with the 128k vocabulary + 1-layer adapter, 64 × 32 (CPU-sized: the
  vocabulary's cost without the model's).

    python benchmarks/rollout.py --shape gpt2-large --modes full recompute
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
SHAPES = {  # base, adapter (its own model, or the base's first k layers), paper-scale batch × new tokens
    "gpt2-large": {"base": {"family": "gpt2", "vocab": 50257, "hidden": 1280, "layers": 36, "heads": 20},
                   "adapter": {"family": "gpt2", "vocab": 50257, "hidden": 768, "layers": 12, "heads": 12}, "batch": 128, "new_tokens": 20,
                   "minibatch_size": 128},
    "llama-3.2-1b": {"base": {"family": "llama", "vocab": 128256, "hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192},
                     "adapter": 2, "batch": 512, "new_tokens": 128, "minibatch_size": 32},
    "llama-128k-tiny": {"base": {"family": "llama", "vocab": 128256, "hidden": 256, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 512},
                        "adapter": 1, "batch": 64, "new_tokens": 32, "minibatch_size": 16},
}


def save_model(folder: Path, shape: dict, tokenizer) -> None:
    """A random causal LM of ``shape`` with ``tokenizer``, saved to ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if shape["family"] == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=shape["vocab"], n_embd=shape["hidden"], n_layer=shape["layers"], n_head=shape["heads"],
                                           n_positions=1024, bos_token_id=tokenizer.eos_token_id, **special))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                                             num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                                             num_key_value_heads=shape["kv_heads"], max_position_embeddings=2048, **special))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_classifier(folder: Path, tokenizer) -> None:
    """A random RoBERTa-base sequence classifier (2 labels) over ``tokenizer``: Detoxify's shape."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id, type_vocab_size=1, num_labels=2)
    RobertaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build(folder: Path, shape: str) -> None:
    """Base, adapter (if its own model) and reward classifier of ``shape`` under ``folder``."""
    from tests.conftest import train_tokenizer  # built in-process: no download

    tokenizer = train_tokenizer(400, ["<eos>", "<pad>"])
    spec = SHAPES[shape]
    save_model(folder / "base", spec["base"], tokenizer)
    if isinstance(spec["adapter"], dict):
        save_model(folder / "adapter", spec["adapter"], tokenizer)
    save_classifier(folder / "reward", tokenizer)


def synchronize(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def run_mode(args: argparse.Namespace) -> dict:
    """One mode in this process: one RL step (sample, reward, update), timed by phase."""
    import torch

    from lightning_ipa import Adapter, AdapterConfig, LocalBase, Sampling, TailoredPolicy
    from lightning_ipa.rewards import ClassifierReward
    from lightning_ipa.types import select

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder, spec = Path(args.folder), SHAPES[args.shape]
    base = LocalBase(str(folder / "base"), dtype=args.dtype, top_k=args.top_k if args.mode == "top_k" else None).to(device)
    adapter_config = AdapterConfig(name_or_path=str(folder / "adapter"), num_layers=None) if isinstance(spec["adapter"], dict) else AdapterConfig(num_layers=spec["adapter"])
    adapter = Adapter.build(adapter_config, base).to(device)
    reward = ClassifierReward(str(folder / "reward")).to(device)
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-5)
    n = args.new_tokens
    policy = TailoredPolicy(base, adapter, sampling=Sampling(max_new_tokens=n, min_new_tokens=n, decoding=args.decoding)).to(device)
    prompts = policy.encode(["The quick brown fox jumps over the lazy dog, and then"] * args.batch)
    start = synchronize(device)
    rollout = policy.sample(prompts, torch.Generator(device).manual_seed(0), memory=args.mode)
    sampled = synchronize(device)
    texts = base.tokenizer.batch_decode(rollout.response_ids % len(base.tokenizer), skip_special_tokens=True)
    scores = reward([""] * len(texts), texts, [{}] * len(texts))["reward"]
    rewarded = synchronize(device)
    advantages = scores.float().to(device)[:, None] - 0.5
    for rows in torch.arange(args.batch, device=device).split(args.minibatch_size):  # IPAModule.update, one epoch
        minibatch = select(rollout, rows)
        if minibatch.base_distribution is None:
            minibatch = policy.read(minibatch)
        output = policy(minibatch, with_kl=True)
        mask = minibatch.response_mask
        loss = -(output.logprobs * advantages[rows] * mask).sum() / mask.sum() + 0.05 * (output.kl * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    done = synchronize(device)
    kept = sum(t.numel() * t.element_size() for t in (rollout.base_distribution, rollout.base_support) if t is not None)
    if args.mode == "recompute":
        kept = 0  # read just before the update; nothing crosses from sampling to it
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": args.mode, "sample_s": sampled - start, "reward_s": rewarded - sampled, "update_s": done - rewarded, "kept_bytes": kept,
            "peak_bytes": peak, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-128k-tiny")
    parser.add_argument("--batch", type=int, help="samples per rollout (B; default: the shape's)")
    parser.add_argument("--new-tokens", type=int, help="tokens per response (T; default: the shape's)")
    parser.add_argument("--minibatch-size", type=int, help="rows per update (default: the shape's)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="rollout_memory modes to run")
    parser.add_argument("--top-k", type=int, default=20, help="the base's support in the top_k mode (an API base's top_logprobs)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the base's weights")
    parser.add_argument("--decoding", default="auto", choices=["auto", "eager", "static", "compiled"], help="Sampling.decoding")
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmark_rollout" / "rollout.json"), help="where the table is written (JSON)")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or SHAPES[args.shape]["batch"]
    args.new_tokens = args.new_tokens or SHAPES[args.shape]["new_tokens"]
    args.minibatch_size = args.minibatch_size or SHAPES[args.shape]["minibatch_size"]
    if args.mode:  # a child: one mode
        print(json.dumps(run_mode(args)))
        return
    with tempfile.TemporaryDirectory() as folder:
        build(Path(folder), args.shape)
        rows = []
        for mode in args.modes:
            child = [sys.executable, __file__, "--mode", mode, "--folder", folder, *sys.argv[1:]]
            done = subprocess.run(child, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                raise SystemExit(f"mode {mode} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = rows[0]
    vocab = SHAPES[args.shape]["base"]["vocab"]
    print(f"\n{args.shape}: B={args.batch} × T={args.new_tokens} × V={vocab}, minibatches of {args.minibatch_size}, base {args.dtype}, decoding {args.decoding}, "
          f"top_k support {args.top_k} (top_k mode only), on {first['device']}; peak ratios to '{first['mode']}'")
    print(f"{'mode':<10} {'sample s':>9} {'reward s':>9} {'update s':>9} {'kept MB':>9} {'peak MB':>9} {'peak ratio':>11}")
    for row in rows:
        print(f"{row['mode']:<10} {row['sample_s']:>9.2f} {row['reward_s']:>9.2f} {row['update_s']:>9.2f} {row['kept_bytes'] / 2**20:>9.1f} "
              f"{row['peak_bytes'] / 2**20:>9.0f} {row['peak_bytes'] / first['peak_bytes']:>11.2f}")
    from results import write_results

    write_results(args.output, vars(args), rows)


if __name__ == "__main__":
    main()
