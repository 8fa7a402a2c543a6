"""Prompt datasets: lists of ``{"prompt": str, "meta": dict}`` served in batches, and the readers of their sources."""

from __future__ import annotations

import codecs
import json
import os
import random
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

PromptBatch = dict[str, list]  # {"prompt": [B] texts, "meta": [B] dicts for the reward}


def collate_prompts(items: Sequence[dict[str, Any]]) -> PromptBatch:
    return {"prompt": [item["prompt"] for item in items], "meta": [item["meta"] for item in items]}


def repeat_prompts(batch: PromptBatch, k: int) -> PromptBatch:
    """Each prompt k times in a row (k samples per prompt stay consecutive)."""
    return {key: [value for value in values for _ in range(k)] for key, values in batch.items()}


def check_sizes(**sizes: Optional[int]) -> None:
    """Raise ValueError for a split size below 0 (None, where allowed, means all); a negative size would slice from the end."""
    if bad := [f"{name}={value} (--data.init_args.{name})" for name, value in sizes.items() if value is not None and value < 0]:
        raise ValueError(f"split sizes must be ≥ 0, got {', '.join(bad)}")


def existing_file(path: str | os.PathLike) -> Path:
    """``path`` (``~`` expanded), or FileNotFoundError saying there is no such file and where a relative path was looked for."""
    path = Path(path).expanduser()
    if not path.is_file():
        hint = "a folder, not a file" if path.is_dir() else f"looked for in {Path.cwd()}" if not path.is_absolute() else "check the path"
        raise FileNotFoundError(f"no such file: {path} ({hint})")
    return path


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 text file, read as it streams; the shared reader of every text file.

    Lines end at a line feed only (CR LF too), so the numbers are an editor's and a JSON string may hold U+2028;
    a leading UTF-8 byte-order mark is skipped.

    Raises:
        FileNotFoundError: no such file (``existing_file``).
        ValueError: a byte that is not UTF-8, named as ``file:line:column`` with its byte offset and how to convert the file.
    """
    path = existing_file(path)
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            skip = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
            try:
                text = raw[skip:].decode("utf-8")
            except UnicodeDecodeError as error:
                start = skip + error.start  # the bad byte's index in the line
                column = len(raw[skip:start].decode("utf-8")) + 1  # in characters, as editors count
                raise ValueError(
                    f"{path}:{number}:{column}: byte 0x{raw[start]:02x} (byte {offset + start} of the file) is not UTF-8; "
                    f"the file must be UTF-8 text: convert it, e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}` "
                    f"(if it is Latin-1), and pass the converted file"
                ) from None
            offset += len(raw)
            yield number, text.rstrip("\r\n")


def json_lines(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """("file:line", value) for each non-blank line of a UTF-8 JSON-lines file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a byte that is not UTF-8 (``text_lines``) or a line that is not JSON, named as file:line.
    """
    for number, line in text_lines(path):
        if line.strip():
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                problem = f"not valid JSON ({error.msg} at column {error.colno}); each line must be one JSON value"
                raise ValueError(f"{path}:{number}: {problem}") from None


def read_records(source: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of a dataset: a local ``.jsonl``/``.json`` (JSON lines) or ``.parquet``
    file, or else ``split`` of a hub dataset through HF ``datasets``. ``where`` (file:line, or row number)
    is for error messages about the record.

    Raises:
        FileNotFoundError: a local file that does not exist.
        ValueError: a JSON-lines file that is not UTF-8 (``text_lines``) or has a line that is not JSON (file:line),
            or a local file of another kind.
        RuntimeError: a hub dataset that cannot be loaded (e.g. offline).
    """
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json"):
        yield from json_lines(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet

        for number, record in enumerate(pyarrow.parquet.read_table(existing_file(path)).to_pylist(), start=1):
            yield f"{path} row {number}", record
    elif path.exists() or source.startswith(("/", "./", "../", "~")):
        raise ValueError(f"{source}: expected a .jsonl, .json (JSON lines) or .parquet file, or a hub dataset name")
    else:
        yield from _read_hub(source, split)


def _read_hub(name: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets

        records = datasets.load_dataset(name, split=split)
    except Exception as error:  # no network, no such dataset, ...
        raise RuntimeError(
            f"could not load the hub dataset {name!r} ({type(error).__name__}: {error}). Offline, download it "
            f"elsewhere as JSON lines or Parquet and pass its path: --data.init_args.source PATH"
        ) from error
    for number, record in enumerate(records, start=1):
        yield f"{name} row {number}", record


class EpochShuffle(DistributedSampler):
    """The training prompts' order: a fresh permutation for each pass, drawn from (seed, pass number) alone,
    dealt to the processes, resumable mid-pass.

    Process r of W takes every W-th prompt of the permutation from the r-th, cut to whole batches (as ``drop_last``;
    the few left over wait for the next pass, which reshuffles). The order depends on nothing the model draws at
    random, so runs with one seed see the same prompts whatever the algorithm. ``state_dict`` is the pass and how
    many prompts of it this process has been dealt: torchdata's ``StatefulDataLoader`` (the train loader of
    ``PromptDataModule``) saves it with its own position, Lightning saves that in the checkpoint, and a run resumed
    mid-pass carries on with the rest of the same pass: it sees the prompts, in the order, of a run never stopped.
    A ``DistributedSampler``, so Lightning keeps it under DDP rather than wrapping it.
    """

    def __init__(self, size: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        """
        Args:
            size: Prompts in the training split.
            batch_size: Prompts per batch and process (the DataLoader's).
            seed: Seed of the permutations (``seed_everything``'s).
            num_replicas: Processes (world size).
            rank: This process's global rank.
        """
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)  # type: ignore[arg-type]
        self.size, self.batch_size = size, batch_size
        self.num_samples = size // num_replicas // batch_size * batch_size  # [this process's prompts per pass]
        self.total_size = self.num_samples * num_replicas
        self.passes = 0  # passes begun
        self.dealt = 0  # prompts of the current pass handed out
        self._resume_at = 0  # where the next pass begins (mid-pass after load_state_dict)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.passes)
        order = torch.randperm(self.size, generator=generator).tolist()[self.rank : self.total_size : self.num_replicas]
        self.passes += 1
        self.dealt, self._resume_at = self._resume_at, 0
        for index in order[self.dealt :]:
            self.dealt += 1
            yield index

    def __len__(self) -> int:
        return self.num_samples

    def settings(self) -> dict[str, int]:
        """What the order of a pass depends on."""
        return {"size": self.size, "batch_size": self.batch_size, "seed": self.seed, "num_replicas": self.num_replicas}

    def state_dict(self) -> dict[str, int]:
        return {"passes": self.passes, "dealt": self.dealt, **self.settings()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue where ``state_dict`` was taken: within its pass, or with the next one if that pass was dealt out.

        If the order's settings changed since (training prompts, batch size, seed, processes), the place in the pass
        no longer means the same prompts: a warning says so and training goes on with a new pass.
        """
        passes, dealt = state_dict["passes"], state_dict["dealt"]
        changed = {k: (state_dict[k], v) for k, v in self.settings().items() if k in state_dict and state_dict[k] != v}
        was = {k: state_dict.get(k, v) for k, v in self.settings().items()}
        dealt_out = was["size"] // was["num_replicas"] // was["batch_size"] * was["batch_size"]  # a pass then
        if changed and 0 < dealt < dealt_out:
            listed = ", ".join(f"{k} {old} → {new}" for k, (old, new) in changed.items())
            rank_zero_warn(f"The training prompts' order changed since the checkpoint ({listed}): its place in pass {passes} "
                           f"does not apply, so training goes on with a new pass")
            dealt = self.num_samples
        mid_pass = 0 < dealt < self.num_samples
        self.passes, self._resume_at = (passes - 1, dealt) if mid_pass else (passes, 0)


class EvalShards(DistributedSampler):
    """One process's share of an evaluation split: one process's batches, dealt round-robin, each prompt once.

    The split cut into batches of ``batch_size`` in order is what a single process runs; rank r of W runs
    batches r, r + W, r + 2W, ... So its i-th batch is batch i·W + r of one process, with the same prompts
    (hence the same padding and, seeded per batch, the same draws: ``IPAModule.generate``), and ranks run
    at most one batch more than each other. Lightning's own ``DistributedSampler`` would repeat prompts to
    even the shards (scored twice), and its ``UnrepeatedDistributedSampler`` deals single prompts, which
    changes every batch. With fewer batches than processes, the split is cut into W near-equal contiguous
    batches instead, one per rank (a rank with no batch would leave the others waiting at the metrics' sync):
    then the draws differ from one process's. A ``DistributedSampler``, so Lightning keeps it as it is.
    """

    def __init__(self, size: int, batch_size: int, num_replicas: int = 1, rank: int = 0):
        """
        Args:
            size: Prompts in the split.
            batch_size: Prompts per batch (the DataLoader's).
            num_replicas: Processes (world size).
            rank: This process's global rank.
        """
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        if 0 < size < num_replicas:
            raise ValueError(f"{size} prompts for {num_replicas} processes: each needs at least one; use fewer devices")
        starts = list(range(0, size, batch_size))
        if 0 < len(starts) < num_replicas:
            starts = [r * (size // num_replicas) + min(r, size % num_replicas) for r in range(num_replicas)]
        bounds = [*starts, size]
        self.indices = [i for b in range(rank, len(starts), num_replicas) for i in range(bounds[b], bounds[b + 1])]
        self.num_samples, self.total_size = len(self.indices), size

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


class PromptDataModule(LightningDataModule):
    """Serves prompt splits; a task's subclass fills ``self.splits`` in ``setup``.

    ``predict`` uses the ``"predict"`` split when the task has one, else ``"val"``.
    """

    def __init__(self, batch_size: int = 8, eval_batch_size: int = 32, num_workers: int = 0):
        """
        Args:
            batch_size: Prompts per RL step and device (samples = prompts × the algorithm's samples_per_prompt).
            eval_batch_size: Prompts per validation/test/predict batch.
            num_workers: DataLoader worker processes.

        Raises:
            ValueError: a batch size below 1 or a negative ``num_workers``.
        """
        super().__init__()
        for name, value, least in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0)):
            if value < least:
                raise ValueError(f"{name} must be ≥ {least}, got {value}: set --data.init_args.{name}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.splits: dict[str, list[dict[str, Any]]] = {}

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        self.check_split(split)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything
        shards = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}  # Lightning keeps
        sampler: Optional[Sampler[int]] = None  # a DistributedSampler as it is: these deal the prompts to the processes
        if train:
            sampler = EpochShuffle(len(self.splits[split]), self.batch_size, seed, **shards)
        elif shards:  # evaluation: each prompt once, in one process's batches
            sampler = EvalShards(len(self.splits[split]), self.eval_batch_size, **shards)
        return (StatefulDataLoader if train else DataLoader)(  # the train loader's position goes into checkpoints
            self.splits[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            collate_fn=collate_prompts,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(seed),  # each new iterator draws a seed: never from the global RNG
        )

    def train_dataloader(self) -> DataLoader:
        """Raises ValueError for a training split without one whole batch per process (``check_split``)."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Raises ValueError for an empty or missing split (``check_split``)."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """The ``test`` split, else ``val``; raises ValueError when it is empty (``check_split``)."""
        return self._loader(self.stage_split("test"))

    def predict_dataloader(self) -> DataLoader:
        """The ``predict`` split, else ``val``; raises ValueError when it is empty (``check_split``)."""
        return self._loader(self.stage_split("predict"))

    def stage_split(self, stage: str) -> str:
        """The split an evaluation stage ('validate', 'test', 'predict') reads: its own when the task has it, else ``val``."""
        split = {"validate": "val", "test": "test", "predict": "predict"}[stage]
        return split if split in self.splits else "val"

    def check_splits(self, stage: str) -> None:
        """``check_split`` of each split ``stage`` ('fit', 'validate', 'test', 'predict') reads, after ``setup``.

        ``fit`` reads ``train`` and, unless the trainer's ``limit_val_batches`` is 0, ``val``. Lightning asks for the
        validation loader only at the first validation, after training began: ``IPAModule.setup`` calls this first.

        Raises:
            ValueError: as ``check_split``.
        """
        if stage != "fit":
            self.check_split(self.stage_split(stage))
            return
        self.check_split("train")
        if self.trainer is None or self.trainer.limit_val_batches != 0:
            self.check_split("val")

    def check_split(self, split: str) -> None:
        """Refuse a split that is missing or empty, or for ``train`` one without a whole batch for each process.

        The train loader serves whole batches only, and under DDP each of the ``trainer.world_size`` processes
        gets its share of the prompts (``EpochShuffle``): with fewer prompts than a batch per process no RL step
        would run.

        Raises:
            ValueError: naming the split, where its prompts come from (``split_source``) and how to fix it.
        """
        if split not in self.splits:
            raise ValueError(f"{type(self).__name__} has no {split!r} split (has {sorted(self.splits)})")
        size, source = len(self.splits[split]), self.split_source(split)
        if split == "train":
            processes = self.trainer.world_size if self.trainer is not None else 1
            share = size // processes  # EpochShuffle: each process takes every W-th prompt of a pass
            if share < self.batch_size:
                shared = f", shared by {processes} processes: {share} each" if processes > 1 else ""
                fixes = [f"lower --data.init_args.batch_size to at most {share}"] if share else []
                fixes += ["use fewer devices"] if processes > 1 and size >= self.batch_size else []
                fixes += [f"give at least {self.batch_size * processes} training prompts"]
                raise ValueError(
                    f"{size} training prompt{'s' * (size != 1)} ({source}){shared}, fewer than one batch (batch_size={self.batch_size}): "
                    f"the train loader serves whole batches only, so no RL step would run; {', or '.join(fixes)}"
                )
        elif size == 0:
            fix = "give it at least one prompt"
            if split == "val" and self.trainer is not None and self.trainer.state.fn == "fit":
                fix += ", or train without validation: --trainer.limit_val_batches=0"
            raise ValueError(f"{type(self).__name__}: the {split!r} split is empty ({source}): nothing to run; {fix}")

    def split_source(self, split: str) -> str:
        """Where ``split``'s prompts come from, as the data options that set it (for error messages)."""
        hp = self.hparams
        if hp.get(f"{split}_file"):
            return f"{split}_file={hp[f'{split}_file']}"
        options = [f"{name}={hp[name]}" for name in ("source", f"{split}_size") if name in hp]
        return ", ".join(options) or f"filled by {type(self).__name__}.setup"

    def setup(self, stage: Optional[str] = None) -> None:
        raise NotImplementedError

    def split(self, items: list[dict[str, Any]], test_size: int, val_size: int, train_size: Optional[int], seed: int, what: str) -> None:
        """Shuffle ``items`` with ``seed`` and cut them into ``self.splits`` test, val and train (``train_size`` None: the rest).

        ``what`` says what the items are (e.g. "data.jsonl: 80 of 95 prompts pass the filters") for the error
        raised when there are too few: fewer than the sizes, or than one training batch.

        Raises:
            ValueError: a negative size, or too few items.
        """
        check_sizes(test_size=test_size, val_size=val_size, train_size=train_size)
        items = list(items)
        random.Random(seed).shuffle(items)
        needed = test_size + val_size + (train_size or self.batch_size)
        if len(items) < needed:
            raise ValueError(f"{what}: fewer than test_size + val_size + train_size (or one batch) = {needed}; lower the sizes")
        train_end = None if train_size is None else test_size + val_size + train_size
        self.splits = {"test": items[:test_size], "val": items[test_size : test_size + val_size], "train": items[test_size + val_size : train_end]}
