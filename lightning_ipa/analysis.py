"""Load runs into pandas DataFrames and plot them (for notebooks): TensorBoard scalars and sample tables,
``predictions.jsonl``/``generations.jsonl`` and ``results.json``.

A *run* is a logger version folder, e.g. ``runs/quickstart/version_0``; its name in tables and legends is
the path relative to the common parent of the runs compared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import matplotlib.pyplot as plt
import pandas as pd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from .data import json_lines

PathLike = Union[str, Path]


def run_names(runs: Sequence[PathLike]) -> dict[Path, str]:
    """Each run folder → a short name: its path below the runs' common parent."""
    paths = [Path(run) for run in runs]
    if len(paths) == 1:
        return {paths[0]: f"{paths[0].parent.name}/{paths[0].name}"}
    parent = Path(os.path.commonpath([p.resolve() for p in paths]))
    return {p: str(p.resolve().relative_to(parent)) for p in paths}


def events(run: PathLike) -> EventAccumulator:
    accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def load_scalars(runs: Sequence[PathLike], tags: Optional[Iterable[str]] = None) -> pd.DataFrame:
    """Every logged scalar of the runs: columns ``run, tag, step, value, wall_time`` (``tags``: only these)."""
    wanted = None if tags is None else set(tags)
    rows = []
    for path, name in run_names(runs).items():
        accumulator = events(path)
        for tag in accumulator.Tags()["scalars"]:
            if wanted is None or tag in wanted:
                rows += [(name, tag, e.step, e.value, e.wall_time) for e in accumulator.Scalars(tag)]
    frame = pd.DataFrame(rows, columns=["run", "tag", "step", "value", "wall_time"])
    return frame.sort_values(["run", "tag", "step"], kind="stable", ignore_index=True)  # a resumed run's files may load out of order


def final_values(scalars: pd.DataFrame, prefix: str = "val/") -> pd.DataFrame:
    """The last logged value of each tag under ``prefix``, one row per run and one column per tag."""
    last = scalars[scalars.tag.str.startswith(prefix)].sort_values("step").groupby(["run", "tag"]).value.last()
    return last.unstack("tag")


def load_samples(run: PathLike, tag: str = "val/samples") -> pd.DataFrame:
    """The sample tables a ``SampleTable`` callback wrote (one per validation), with their step."""
    frames = []
    for event in events(run).Tensors(f"{tag}/text_summary"):
        table = tensor_util.make_ndarray(event.tensor_proto).item().decode()
        frames.append(markdown_table_frame(table).assign(step=event.step))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def markdown_table_frame(table: str) -> pd.DataFrame:
    """A Markdown table (as ``callbacks.markdown_table`` writes it) back into a DataFrame; numbers parsed."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    split = lambda line: [cell.strip().replace("\\|", "|") for cell in line.strip("|").split(" | ")]  # noqa: E731
    frame = pd.DataFrame([split(line) for line in lines[2:]], columns=split(lines[0]))
    for column in frame.columns:
        if column.startswith("reward"):
            frame[column] = pd.to_numeric(frame[column])
    return frame


def load_jsonl(path: PathLike) -> pd.DataFrame:
    """``predictions.jsonl`` or ``generations.jsonl`` as a DataFrame (one row per line).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a byte that is not UTF-8 (file:line:column), or a line that is not JSON (file:line).
    """
    return pd.json_normalize([record for _, record in json_lines(path)])


def load_results(runs: Sequence[PathLike]) -> pd.DataFrame:
    """``results.json`` of ``test`` runs: one row per run and metric, columns ``base`` and ``tailored``."""
    rows = []
    for path, name in run_names(runs).items():
        results = json.loads((Path(path) / "results.json").read_text())
        rows += [{"run": name, "metric": metric, **values} for metric, values in results["metrics"].items()]
    return pd.DataFrame(rows).set_index(["run", "metric"])


def plot_curves(scalars: pd.DataFrame, metrics: Sequence[str], stage: str = "val", train: Sequence[str] = ()) -> plt.Figure:
    """One panel per metric: each run's tailored curve, and the base's level as a dashed reference line.

    ``metrics`` are evaluation metrics (``<stage>/<metric>/tailored`` and ``.../base``); ``train`` adds
    panels of training tags as logged (e.g. ``train/reward``, ``train/kl``).
    """
    panels = [*metrics, *train]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        evaluation = panel in metrics
        tag = f"{stage}/{panel}/tailored" if evaluation else panel
        for i, (run, curve) in enumerate(scalars[scalars.tag == tag].groupby("run")):
            color = f"C{i}"
            ax.plot(curve.step, curve.value, marker="o" if evaluation else None, color=color, label=run)
            base = scalars[(scalars.run == run) & (scalars.tag == f"{stage}/{panel}/base")]
            if evaluation and len(base):
                ax.axhline(base.value.iloc[-1], color=color, linestyle="--", linewidth=1, label=f"{run} (base)")
        ax.set_title(tag if not evaluation else f"{stage}/{panel}")
        ax.set_xlabel("rollouts")  # the step of every series of a fit (callbacks.logging_step)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def plot_reward_histogram(rows: pd.DataFrame, bins: int = 20) -> plt.Figure:
    """Rewards of base and tailored responses (``predictions.jsonl``: ``reward_base``/``reward_tailored``)."""
    figure, ax = plt.subplots(figsize=(5, 3.4))
    for policy, color in (("base", "C7"), ("tailored", "C0")):
        ax.hist(rows[f"reward_{policy}"], bins=bins, alpha=0.6, color=color, label=f"{policy} (mean {rows[f'reward_{policy}'].mean():.3f})")
    ax.set_xlabel("reward")
    ax.set_ylabel("responses")
    ax.legend()
    figure.tight_layout()
    return figure
