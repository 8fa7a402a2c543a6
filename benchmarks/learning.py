"""PPO, Quark and RLOO on the quickstart task under the same training-time budget, side by side.

Each (algorithm, seed) is a real ``fit`` of conf/quickstart.yaml (plus conf/algorithms/<name>.yaml)
in its own process, ``--jobs`` at a time with the CPU threads split evenly between them, stopped
by ``TrainingClock`` at the first validation past ``--budget`` seconds of training (validation
time excluded). It prints held-out ``val/reward/tailored`` against training seconds for every
run, the base's ``val/reward/base``, and a summary at common times (mean over seeds), and writes
them as results.json and results.md to ``--out``.

    python benchmarks/learning.py --budget 600 --seeds 0 1 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ipa.io import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("ppo", "quark", "rloo")  # rloo: conf/quickstart.yaml as it is
METRICS = ("reward", "coverage", "distinct_2", "corpus_distinct_2")


def fit_command(algorithm: str, seed: int, args: argparse.Namespace) -> list[str]:
    configs = ["--config", str(ROOT / "conf" / "quickstart.yaml")]
    if algorithm != "rloo":
        configs += ["--config", str(ROOT / "conf" / "algorithms" / f"{algorithm}.yaml")]
    return [
        sys.executable, "-m", "lightning_ipa", "fit", *configs,
        f"--seed_everything={seed}",
        "--model.max_rollouts=null",  # TrainingClock ends the run
        "--trainer.max_epochs=-1",
        f"--trainer.val_check_interval={args.val_every}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={args.out}",
        f"--trainer.logger.init_args.name={algorithm}_seed{seed}",
        "--trainer.logger.init_args.version=0",
        "--trainer.callbacks+=lightning_ipa.callbacks.TrainingClock",
        f"--trainer.callbacks.budget_seconds={args.budget}",
        f"--data.init_args.val_size={args.val_size}",
    ]


def run(algorithm: str, seed: int, args: argparse.Namespace, threads: int) -> float:
    """One fit in its own process; returns its wall seconds. Its output goes to <out>/<run>.log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    log = args.out / f"{algorithm}_seed{seed}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(fit_command(algorithm, seed, args), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{algorithm} seed {seed} failed (exit {code}); see {log}")
    wall = time.perf_counter() - start
    print(f"  done: {algorithm} seed {seed} in {wall:.0f} s", flush=True)
    return wall


def curve(run_dir: Path) -> dict:
    """Held-out metrics at each validation, keyed by the training seconds spent by then."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    seconds = {e.step: e.value for e in events.Scalars("time/train_seconds")}
    rollouts = {e.step: int(e.value) for e in events.Scalars("time/rollouts")}
    series = {f"{metric}/{policy}": events.Scalars(f"val/{metric}/{policy}") for metric in METRICS for policy in ("tailored", "base")}
    points = []
    for i, event in enumerate(series["reward/tailored"]):
        point = {"train_seconds": seconds[event.step], "rollouts": rollouts[event.step]}
        points.append({**point, **{key: values[i].value for key, values in series.items()}})
    return {"points": points}


def at(points: list[dict], seconds: float, key: str):
    """The last value measured within ``seconds`` of training (None before the first validation)."""
    values = [p[key] for p in points if p["train_seconds"] <= seconds + 1e-6]
    return values[-1] if values else None


def report(results: dict, args: argparse.Namespace) -> str:
    lines = [f"budget {args.budget:.0f} s of training per run, validation every {args.val_every} rollouts on {args.val_size} held-out prompts", ""]
    lines += ["| run | train s | rollouts | reward tailored | reward base | coverage tailored / base | distinct-2 tailored / base | corpus distinct-2 tailored / base |", "|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        for p in result["points"]:
            lines.append(
                f"| {name} | {p['train_seconds']:.0f} | {p['rollouts']} | {p['reward/tailored']:.3f} | {p['reward/base']:.3f} | "
                f"{p['coverage/tailored']:.3f} / {p['coverage/base']:.3f} | {p['distinct_2/tailored']:.3f} / {p['distinct_2/base']:.3f} | "
                f"{p['corpus_distinct_2/tailored']:.3f} / {p['corpus_distinct_2/base']:.3f} |"
            )
    grid = [args.budget * f for f in (0.25, 0.5, 0.75, 1.0)]
    lines += ["", "mean val/reward/tailored over seeds at equal training time (last validation within it):", ""]
    lines += ["| algorithm | " + " | ".join(f"{t:.0f} s" for t in grid) + " | end of run (s) | base |", "|---|" + "---|" * (len(grid) + 2)]
    for algorithm in args.algorithms:
        runs = [r["points"] for n, r in results.items() if n.startswith(f"{algorithm}_")]
        cells = []
        for t in grid:
            values = [v for v in (at(points, t, "reward/tailored") for points in runs) if v is not None]
            cells.append(f"{statistics.mean(values):.3f}" if len(values) == len(runs) else "–")
        end = statistics.mean(points[-1]["reward/tailored"] for points in runs)
        end_seconds = statistics.mean(points[-1]["train_seconds"] for points in runs)
        base = statistics.mean(points[0]["reward/base"] for points in runs)
        lines.append(f"| {algorithm} | " + " | ".join(cells) + f" | {end:.3f} ({end_seconds:.0f}) | {base:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--budget", type=float, default=600, help="training seconds per run (validation excluded)")
    parser.add_argument("--val-every", type=int, default=20, help="rollouts between validations")
    parser.add_argument("--val-size", type=int, default=128, help="held-out prompts per validation")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time; the CPU threads are split between them")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmark_learning")
    args = parser.parse_args()

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs = [(a, s) for s in args.seeds for a in args.algorithms]
    print(f"{len(runs)} runs, {args.jobs} at a time with {threads} thread(s) each; logs in {args.out}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        walls = dict(zip(runs, pool.map(lambda r: run(*r, args, threads), runs)))

    results = {}
    for algorithm, seed in runs:
        name = f"{algorithm}_seed{seed}"
        results[name] = {**curve(args.out / name / "version_0"), "wall_seconds": walls[(algorithm, seed)]}
    text = report(results, args)
    print(text)
    write_text_atomic(args.out / "results.md", text + "\n")
    write_text_atomic(args.out / "results.json", json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
