"""Callbacks: checkpoints at rollout boundaries, a progress bar and a TensorBoard step axis in rollouts, sample tables,
the end-of-fit summary, prediction and test-result files, a training clock."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_info

from .evaluation import POLICIES
from .io import write_text_atomic


def completed_rollouts(trainer: Trainer) -> int:
    """Rollouts (training batches: one RL step each) done so far in the run, resumed runs included: a rollout counts
    once its ``training_step`` has returned, so inside it the count is r − 1, and from its ``on_train_batch_end`` on
    (validation after it, a checkpoint saved then, the resumed run) r. This is Lightning's ``processed`` count (its
    ``completed`` lags by one in ``on_train_batch_end`` and in checkpoints saved there, until a restart adds it)."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.processed


def logging_step(trainer: Trainer) -> int:
    """The TensorBoard step of what is logged now: while fitting, the rollouts completed (the one axis of every
    series of a run: ``train/*`` of rollout r, and the validation after it, sit at step r); otherwise Lightning's."""
    return completed_rollouts(trainer) if trainer.state.fn == TrainerFn.FITTING else trainer.fit_loop.epoch_loop._batches_that_stepped


def planned_rollouts(trainer: Trainer, updates_per_rollout: int) -> float:
    """The rollouts ``fit`` runs in all (resumed ones included): the smallest of ``trainer.max_steps`` ÷ optimizer steps
    per rollout (``IPAModule(max_rollouts=…)`` sets it) and ``max_epochs`` × batches per epoch; ``inf`` when neither bounds it."""
    limits = [math.inf]
    if trainer.max_steps is not None and trainer.max_steps > 0:
        limits.append(math.ceil(trainer.max_steps / updates_per_rollout))
    if trainer.max_epochs not in (None, -1):
        limits.append(trainer.max_epochs * trainer.num_training_batches)
    return min(limits)


def results_table(trainer: Trainer, stage: str, policies: Sequence[str] = POLICIES) -> dict[str, dict[str, float]]:
    """The ``stage``'s evaluation metrics logged so far, as {metric: {policy: value}}: from ``trainer.callback_metrics``
    keys ``<stage>/<metric>/<policy>`` (``Evaluation.evaluate``), for the ``policies`` named ('base', 'tailored')."""
    table: dict[str, dict[str, float]] = {}
    for key, value in trainer.callback_metrics.items():
        head, _, rest = key.partition("/")
        metric, _, policy = rest.rpartition("/")
        if head == stage and metric and policy in policies:
            table.setdefault(metric, {})[policy] = float(value)
    return {metric: {p: values[p] for p in policies if p in values} for metric, values in table.items()}  # in ``policies``' order


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys as a Markdown table (TensorBoard renders it in the Text tab)."""
    if not rows:
        return ""

    def cell(value: Any) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


class RolloutCheckpoint(ModelCheckpoint):
    """``last.ckpt``, the run's resume point, written at rollout boundaries: every ``every_n_rollouts`` rollouts,
    after each validation, at the end of ``fit``, and when the run stops between two rollouts on an exception or
    a SIGTERM (a cluster's pre-emption: Lightning raises it at the next rollout boundary).

    A rollout (or validation) cut short by an exception (a reward that raises, a non-finite loss) is not a state a
    run ever passes through: the weights may be half-updated. Then ``last.ckpt`` stays the previous boundary and
    the message says which; nothing is written either before the first rollout of the process. So a crash loses
    at most ``every_n_rollouts`` rollouts, and any ``last.ckpt`` resumes exactly (``fit --ckpt_path last``).
    Each checkpoint is written beside its target and renamed onto it (``_save_checkpoint``), so a kill while
    saving leaves the previous ``last.ckpt`` whole. With ``monitor`` it also keeps the ``save_top_k`` best
    checkpoints at validations, as ``ModelCheckpoint``.
    """

    def __init__(
        self,
        every_n_rollouts: Optional[int] = 10,
        dirpath: Optional[str] = None,
        monitor: Optional[str] = None,
        mode: str = "min",
        save_top_k: int = 0,
        filename: Optional[str] = None,
        verbose: bool = False,
    ):
        """
        Args:
            every_n_rollouts: Rollouts (training batches) between two writes of ``last.ckpt`` (None: only at
                validations, the end and interruptions).
            dirpath: Folder of the checkpoints (None: the run's ``checkpoints/``).
            monitor: A logged metric by which to keep the best checkpoints at validations (e.g. ``val/reward/tailored``).
            mode: 'max' or 'min' for ``monitor``.
            save_top_k: Best checkpoints to keep by ``monitor`` (0: only ``last.ckpt``).
            filename: Name pattern of those (``ModelCheckpoint``'s).
            verbose: Report each save.
        """
        if every_n_rollouts is not None and every_n_rollouts < 1:
            raise ValueError(f"every_n_rollouts must be ≥ 1 (or None), got {every_n_rollouts}")
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, verbose=verbose, save_last=True, save_top_k=save_top_k,
                         save_on_exception=True, mode=mode, enable_version_counter=False)  # last.ckpt: one, always the newest
        self.every_n_rollouts = every_n_rollouts
        self._in_rollout = False
        self._rollouts_here = 0  # completed by this process (an error before the first leaves nothing behind)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._in_rollout = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._in_rollout = False
        self._rollouts_here += 1
        done = completed_rollouts(trainer)
        if self.every_n_rollouts and done % self.every_n_rollouts == 0 and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # the best by ``monitor``, if any
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:  # the end is a resume point too
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        """``ModelCheckpoint``'s, written beside ``filepath`` and then renamed onto it, so that the replacement is
        atomic on its own filesystem (Lightning stages the file in ``$TMPDIR``, and a move from another filesystem is
        a copy, which a kill can cut short)."""
        partial = f"{filepath}.partial"
        super()._save_checkpoint(trainer, partial)
        if trainer.is_global_zero:
            self._fs.mv(partial, filepath)
        self._last_checkpoint_saved = filepath

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if self._in_rollout or trainer.validating:
            what = "a rollout" if self._in_rollout else "validation"
            kept = "none was written yet"
            if self.last_model_path:
                kept = f"the last one stays {self.last_model_path} (step {self._last_global_step_saved})"
            rank_zero_info(f"{type(exception).__name__} during {what}: not a state to resume from, so no checkpoint now; {kept}")
        elif self._rollouts_here and self._should_save_on_exception(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            saved = f"saved {self.last_model_path} (step {trainer.global_step})"
            rank_zero_info(f"{type(exception).__name__}: {saved}; resume with --ckpt_path last")


class RolloutProgressBar(RichProgressBar):
    """Lightning's (rich) progress bar, counting rollouts: one bar for the whole of ``fit`` (not one per pass over the
    prompts), from the rollouts a resumed run has done to ``planned_rollouts``, so that its speed and time remaining
    are in rollouts. ``IPAModule.configure_callbacks`` puts it in place of a ``RichProgressBar`` (Lightning's default,
    or yours, whose settings it keeps). Takes ``RichProgressBar``'s arguments."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.is_disabled or self.progress is None:
            return
        updates = pl_module.updates_per_rollout() if hasattr(pl_module, "updates_per_rollout") else 1
        self.train_progress_bar_id = self.progress.add_task(  # begun where a resumed run is: no jump in the speed
            f"{'Rollouts':<{len(self.validation_description)}}", total=planned_rollouts(trainer, updates), completed=completed_rollouts(trainer)
        )
        self.refresh()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Nothing: the bar goes on across passes over the prompts (Lightning's restarts at each)."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._update(self.train_progress_bar_id, completed_rollouts(trainer))
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {"epoch": str(trainer.current_epoch), **metrics}


class FitSummary(Callback):
    """When ``fit`` has ended (not on an error), prints where the run is, the held-out results of its last validation (base vs tailored, per
    metric) and the command that opens TensorBoard on it. ``IPAModule.configure_callbacks`` adds it."""

    def __init__(self) -> None:
        self.table: dict[str, dict[str, float]] = {}
        self.rollout = 0

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self.rollout = completed_rollouts(trainer)
        self.table = results_table(trainer, "val")

    def summary(self, trainer: Trainer) -> str:
        """The text printed at the end: run folder, held-out table, and the commands that look at, test and resume the run."""
        folder = shown_path(run_folder(trainer))
        lines = [f"Run: {folder} ({completed_rollouts(trainer)} rollouts)"]
        if self.table:
            width = max(len(metric) for metric in self.table)
            lines.append(f"Held-out, after rollout {self.rollout}:")
            lines.append(f"  {'metric':<{width}}  {'base':>8}  {'tailored':>8}  {'change':>8}")
            for metric, values in self.table.items():
                base, tailored = values.get("base", math.nan), values.get("tailored", math.nan)
                lines.append(f"  {metric:<{width}}  {base:>8.3f}  {tailored:>8.3f}  {tailored - base:>+8.3f}")
        roots = sorted({str(shown_path(Path(logger.root_dir))) for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)})
        if roots:
            lines.append(f"TensorBoard: {env_command('tensorboard')} --logdir {' '.join(roots)}")
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "")
        if checkpoint:
            config = folder / "config.yaml"
            run = f"--config {config} " if config.is_file() else ""
            cli, checkpoint = f"{env_command('python')} -m lightning_ipa", shown_path(Path(checkpoint))
            lines.append(f"Test it:   {cli} test {run}--ckpt_path {checkpoint}")
            lines.append(f"Resume it: {cli} fit {run}--ckpt_path {checkpoint} --model.max_rollouts=<more>")
        return "\n".join(lines)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero and trainer.state.status != TrainerStatus.INTERRUPTED:  # after the progress bar's last line
            print(self.summary(trainer))


def run_folder(trainer: Trainer) -> Path:
    """``trainer.log_dir`` (the run's folder), found without its broadcast, so that one rank alone may ask."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    return Path(logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir or trainer.default_root_dir)


def shown_path(path: Path) -> Path:
    """``path`` relative to the working directory when it is under it (as a user would type it), else as it is."""
    try:
        return path.absolute().relative_to(Path.cwd())
    except ValueError:
        return path


def env_command(name: str) -> str:
    """How to call this environment's ``python`` or console script ``name``: the bare name if that is what PATH finds
    (an activated environment), else its full path."""
    local = Path(sys.executable) if name == "python" else Path(sys.executable).with_name(name)
    found = shutil.which(name)
    return name if found and Path(found).resolve() == local.resolve() else str(shown_path(local))


class SampleTable(Callback):
    """After each validation, writes a few prompts with base and tailored responses to TensorBoard (at the step of
    the validation's scalars: ``logging_step``)."""

    def __init__(self, tag: str = "val/samples"):
        """
        Args:
            tag: TensorBoard text tag.
        """
        self.tag = tag

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and pl_module.evaluation.samples:
                logger.experiment.add_text(self.tag, markdown_table(pl_module.evaluation.samples), logging_step(trainer))


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) in it replaced by None, so that it is standard JSON (``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON lines, atomically; a non-finite number (an undefined score) is written as ``null``."""
    write_text_atomic(path, "".join(json.dumps(finite_or_null(row), ensure_ascii=False, allow_nan=False) + "\n" for row in rows))


def per_rank(path: Path, trainer: Trainer) -> Path:
    """``path`` itself in a single process; ``<stem>.rank<r><suffix>`` under DDP, where each rank writes its own."""
    return path if trainer.world_size == 1 else path.with_suffix(f".rank{trainer.global_rank}{path.suffix}")


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict`` results as JSON lines (one file per rank under DDP)."""

    def __init__(self, output: Optional[str] = None):
        """
        Args:
            output: JSONL path (None: predictions.jsonl in the run's log directory).
        """
        super().__init__(write_interval="epoch")
        self.output = output

    def path(self, trainer: Trainer) -> Path:
        return per_rank(Path(self.output or Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"), trainer)

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any) -> None:
        path = self.path(trainer)
        write_jsonl(path, [row for batch in predictions for row in batch])
        print(f"Wrote {sum(len(batch) for batch in predictions)} predictions to {path}")


class TestResults(Callback):
    """After ``test``: the results table (a column per policy: base, tailored, each one compared) as JSON and Markdown,
    and every generation as JSONL.

    Written atomically into the run's log directory, beside the TensorBoard events:
    ``results.json``, ``results.md`` and ``generations.jsonl`` (one row per prompt: its k samples per
    policy with their scores; one file per rank under DDP). Each metric's convention (its ``convention``
    line: reference, tokenisation, denominator) is a column of results.md and ``conventions`` in results.json.
    """

    @staticmethod
    def conventions(pl_module: LightningModule) -> dict[str, str]:
        """Each test metric's one-line convention by name (the tailored policy's metrics; the base's are the same kind)."""
        tested = pl_module.evaluation.stage_metrics["test_tailored"]
        return {name: str(getattr(metric, "convention", "")) for name, metric in tested.items()}

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        generations = per_rank(folder / "generations.jsonl", trainer)
        written = pl_module.evaluation.generations
        write_jsonl(generations, written)
        prompts = int(trainer.strategy.reduce(torch.tensor(float(len(written)), device=pl_module.device), reduce_op="sum").item())
        if not trainer.is_global_zero:
            return
        policies = pl_module.evaluation.policies("test")
        table = results_table(trainer, "test", policies)  # NaN where undefined: null in results.json
        conventions = self.conventions(pl_module)
        checkpoint = str(Path(trainer.ckpt_path).resolve()) if trainer.ckpt_path else None  # absolute: export finds it from anywhere
        results = {"checkpoint": checkpoint, "prompts": prompts,
                   "samples_per_prompt": pl_module.evaluation.num_samples("test"), "metrics": table,
                   "conventions": {metric: conventions.get(metric, "") for metric in table}}
        write_text_atomic(folder / "results.json", json.dumps(finite_or_null(results), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        rows = [{"metric": metric, **{policy: values.get(policy, float("nan")) for policy in policies}, "convention": conventions.get(metric, "")}
                for metric, values in table.items()]
        heading = f"Test: {prompts} prompts × {results['samples_per_prompt']} samples per policy; checkpoint {checkpoint}\n\n"
        write_text_atomic(folder / "results.md", heading + markdown_table(rows) + "\n")
        print(f"Wrote results.json, results.md and {generations.name} to {folder}")


class TrainingClock(Callback):
    """Times training alone (validation excluded): logs ``time/train_seconds`` and ``time/rollouts`` at each validation.

    With ``budget_seconds`` it ends ``fit`` at the first validation past the budget, so that runs
    compare at equal training time (benchmarks/learning.py). The clock resumes with the run.
    """

    def __init__(self, budget_seconds: Optional[float] = None):
        """
        Args:
            budget_seconds: Training seconds after which ``fit`` stops (None: never).
        """
        self.budget_seconds = budget_seconds
        self.elapsed = 0.0
        self.rollouts = 0
        self._batch_start = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.elapsed += time.perf_counter() - self._batch_start
        self.rollouts += 1

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:  # logged at the step of the validation metrics
            pl_module.log_dict({"time/train_seconds": self.elapsed, "time/rollouts": float(self.rollouts)})

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and self.budget_seconds is not None:  # any rank past the budget stops them all
            over = trainer.strategy.reduce_boolean_decision(self.elapsed >= self.budget_seconds, all=False)
            trainer.should_stop = trainer.should_stop or over

    def state_dict(self) -> dict[str, float]:
        return {"elapsed": self.elapsed, "rollouts": self.rollouts}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.elapsed, self.rollouts = state_dict["elapsed"], state_dict["rollouts"]
