"""Evaluation under DDP is exact: 2 gloo processes on CPU score every prompt once and agree with one process.

Each multi-process run has a timeout (gloo's own and the test's), so a desynchronised collective fails the
test instead of blocking CI.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import ROOT, tiny_args

TIMEOUT = 300  # seconds for one pair of processes; gloo's collectives give up after 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the sampler: whole single-process batches, dealt round-robin ----

def shards(size: int, batch_size: int, world: int) -> list[list[list[int]]]:
    """Each rank's batches, as a DataLoader with ``batch_size`` cuts the sampler's indices."""
    from lightning_ipa.data import EvalShards

    out = []
    for rank in range(world):
        indices = list(EvalShards(size, batch_size, world, rank))
        assert len(indices) == len(EvalShards(size, batch_size, world, rank))
        out.append([indices[i : i + batch_size] for i in range(0, len(indices), batch_size)])
    return out


def test_eval_shards_deal_whole_batches_once():
    # 5 prompts, batches of 2 → [0 1] [2 3] [4]: rank 0 gets batches 0 and 2, rank 1 batch 1
    assert shards(5, 2, 2) == [[[0, 1], [4]], [[2, 3]]]
    assert shards(5, 2, 1) == [[[0, 1], [2, 3], [4]]]
    # global batch index = batch_idx · world + rank (what IPAModule.generate seeds with)
    for size, batch, world in [(5, 2, 2), (10, 3, 2), (7, 1, 3), (64, 32, 2), (100, 8, 4)]:
        per_rank = shards(size, batch, world)
        single = shards(size, batch, 1)[0]
        for rank, batches in enumerate(per_rank):
            for batch_idx, indices in enumerate(batches):
                assert indices == single[batch_idx * world + rank]
        assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(size))
    # fewer batches than ranks: every rank still gets prompts (one batch each), each prompt once
    assert shards(5, 32, 2) == [[[0, 1, 2]], [[3, 4]]]
    assert shards(5, 4, 4) == [[[0, 1]], [[2]], [[3]], [[4]]]
    assert shards(0, 4, 2) == [[], []]
    with pytest.raises(ValueError, match="1 prompts for 2 processes"):
        shards(1, 4, 2)


# ---- list-state metrics synced from uneven ranks ----

METRICS_RANK = """
import json, sys
from datetime import timedelta
import torch, torch.distributed as dist
from lightning_ipa.metrics import BLEU, ROUGE, CorpusDistinctN, DistinctN, MeanScore, Samples, stable_hash
from tasks.open_ended import MAUVE

def embed(texts):
    return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(stable_hash(t) % 2**31)) for t in texts])

TEXTS = ["the cat sat on the mat", "a dog ran to the park .", "the cat ran", "birds sing in the morning",
         "a b c d", "the park is green and the dog is happy"]
REFS = [["the cat sat on a mat"], ["a dog runs to the park ."], ["the cat runs", "a cat ran"], [],
        ["a b c d ."], ["the park is green"]]  # prompt 3 has no references

def samples(prompts):
    k = 2
    return Samples([f"prompt {i}" for i in prompts], [f"{TEXTS[i]} {j}" if j else TEXTS[i] for i in prompts for j in range(k)],
                   {"reward": torch.tensor([0.1 * i + 0.01 * j for i in prompts for j in range(k)])}, k,
                   [{"references": REFS[i]} for i in prompts])

def metrics(**kwargs):
    return {"bleu": BLEU(**kwargs), "rouge1": ROUGE("rouge1", **kwargs), "rougeL": ROUGE("rougeL", **kwargs),
            "corpus_distinct_2": CorpusDistinctN(2, **kwargs), "distinct_2": DistinctN(2, **kwargs),
            "reward": MeanScore("reward", **kwargs), "mauve": MAUVE(embed, **kwargs)}

rank, port, scenarios = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
values = {}
for scenario, shares in scenarios.items():
    synced, single = metrics(), metrics(sync_on_compute=False)
    for name in synced:
        if shares[rank]:  # a rank with no prompt never updates
            synced[name].update(samples(shares[rank]))
        if shares[0] + shares[1]:
            single[name].update(samples(shares[0] + shares[1]))
    # synced gathers both ranks
    values[scenario] = {name: [synced[name].compute().item(), single[name].compute().item()] for name in synced}
print(json.dumps(values))
dist.destroy_process_group()
"""


def run_ranks(script: str, *args: str) -> list[str]:
    """Runs ``script`` as ranks 0 and 1 of a gloo group; their stdouts (a hang or an error fails the test)."""
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", script, str(rank), port, *args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = []
    try:
        for rank, process in enumerate(ranks):
            out, err = process.communicate(timeout=TIMEOUT)
            assert process.returncode == 0, f"rank {rank}: {err[-3000:]}"
            outs.append(out)
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return outs


SCENARIOS = {  # prompts of rank 0, of rank 1
    "empty rank": ([0, 1, 2], []),  # rank 1 never updates: its list states are still []
    "no references": ([0, 1, 2], [3]),  # rank 1's only prompt has no references: BLEU/ROUGE skip it
    "uneven": ([0, 1, 2, 3], [4]),  # uneven numbers of samples with references (3 vs 1)
    "uneven, other way": ([5], [0, 1, 2, 3, 4]),
    "empty rank 0": ([], [0, 1, 2]),
    "nothing anywhere": ([], []),
}


def test_list_state_metrics_synced_from_uneven_ranks_equal_one_process():
    for rank, out in enumerate(run_ranks(METRICS_RANK, json.dumps(SCENARIOS))):
        for scenario, values in json.loads(out.strip().splitlines()[-1]).items():
            for name, (synced, single) in values.items():
                assert (math.isnan(synced) and math.isnan(single)) or synced == pytest.approx(single, abs=1e-6), (rank, scenario, name)


# ---- end to end: `python -m lightning_ipa test` with 2 processes ----

def run_cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # one thread: the same float sums in every run
    try:
        out = subprocess.run([sys.executable, "-m", "lightning_ipa", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"timed out (a rank hung?): {str(error.stderr)[-3000:]}")
    assert out.returncode == 0, out.stderr[-3000:]


def rows(folder: Path, name: str) -> list[dict]:
    """The JSONL rows of ``name`` in ``folder``: one file in one process, one per rank under DDP."""
    files = sorted(folder.glob(f"{Path(name).stem}*.jsonl"))
    return sorted((json.loads(line) for f in files for line in f.read_text().splitlines()), key=lambda row: row["prompt"])


def quickstart(tiny_llama: str, save_dir: Path, eval_batch_size: int, devices: int) -> list[str]:
    # 5 held-out prompts; temperature 8: the peaked tiny model then writes varied text, so other draws give other numbers
    return tiny_args(tiny_llama, save_dir, 2, "--data.init_args.val_size=5", f"--data.init_args.eval_batch_size={eval_batch_size}",
                     "--model.sampling.temperature=8.0", "--model.sampling.max_new_tokens=10", f"--trainer.devices={devices}",
                     *(["--trainer.strategy=ddp"] if devices > 1 else []))


def test_two_process_test_scores_each_prompt_once_with_the_single_process_numbers(tiny_llama, tmp_path):
    results = {}
    for devices in (1, 2):  # batches [0 1] [2 3] [4]: rank 0 runs two, rank 1 one (uneven numbers of batches)
        run_cli("test", *quickstart(tiny_llama, tmp_path / str(devices), 2, devices))
        run = tmp_path / str(devices) / "quickstart" / "version_0"
        results[devices] = json.loads((run / "results.json").read_text()), rows(run, "generations.jsonl")
    (single, single_rows), (ddp, ddp_rows) = results[1], results[2]
    assert single["prompts"] == 5 and ddp["prompts"] == 5
    assert len(ddp_rows) == 5 and ddp_rows == single_rows  # each prompt once, with the same draws and scores
    assert ddp["metrics"].keys() == single["metrics"].keys() and "corpus_distinct_2" in ddp["metrics"]
    for metric, values in single["metrics"].items():
        assert ddp["metrics"][metric] == pytest.approx(values, abs=1e-6), metric


def test_two_process_predict_and_test_with_fewer_batches_than_processes(tiny_llama, tmp_path):
    # one batch of 32 > 5 prompts: fewer batches than processes, each still gets prompts (and nobody hangs)
    args = quickstart(tiny_llama, tmp_path, 32, 2)
    run_cli("predict", *args)
    predicted = rows(tmp_path / "quickstart" / "version_0", "predictions.jsonl")
    assert len(predicted) == 5 and len({row["prompt"] for row in predicted}) == 5
    run_cli("test", *args)
    assert json.loads((tmp_path / "quickstart" / "version_1" / "results.json").read_text())["prompts"] == 5
