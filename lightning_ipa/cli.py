"""``python -m lightning_ipa {fit,validate,test,predict,distill,export}``: LightningCLI over IPAModule and a task's data.

``distill`` fits a ``DistillModule`` instead: a local proxy of a (remote) base, for IPA's black-box workflow. ``export``
writes a checkpoint's adapter as a folder transformers reads (``export.export_adapter``).

Runs and checkpoints: the TensorBoard logger's ``save_dir/name/version_N`` is a run's folder (``--trainer.default_root_dir``,
when given, is its ``save_dir``); ``fit`` writes ``checkpoints/last.ckpt`` there (``callbacks.RolloutCheckpoint``).
``--ckpt_path last`` is the newest training run's ``last.ckpt`` (or that of ``--trainer.logger.init_args.version=N``),
and means the same as giving that file: ``fit`` resumes the run in its own folder, the other subcommands write a
new one. The configuration given (files, then the command line) is what runs; a checkpoint brings trained weights
and training state only, and one that does not fit the configured adapter and algorithm is refused.
"""

from __future__ import annotations

import glob
import logging
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .data import PromptDataModule
from .distill import DistillModule
from .module import IPAModule

CONF = Path(__file__).resolve().parents[1] / "conf"


class QuietLightning(logging.Filter):
    """Drops the lines of Lightning's log that a user of this CLI can do nothing with (an advertisement, the rollout
    progress bar replacing Lightning's as it should) or that count in the wrong unit (``max_steps`` optimizer steps,
    where ``fit`` ends with ``FitSummary``'s count of rollouts)."""

    DROPPED = ("💡 Tip:", "`Trainer.fit` stopped: `max_steps=")
    EXPECTED = "The following callbacks returned in `LightningModule.configure_callbacks` will override existing callbacks passed to Trainer: RichProgressBar"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(self.DROPPED) and message != self.EXPECTED  # IPAModule's RolloutProgressBar


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(QuietLightning())
DEFAULT_CONFIG = CONF / "quickstart.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
DESCRIPTION = (
    "Inference-time Policy Adapters: fit an adapter to a reward, validate/test/predict with it (given no --config: "
    "conf/quickstart.yaml). Two more: `distill --config conf/blackbox/distill.yaml` (a local proxy of an API base) and "
    "`export --ckpt_path CKPT --output DIR` (the adapter as a folder for transformers' generate); each takes --help."
)


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback``, written once the run starts (``on_fit_start``, or the start of
    validate/test/predict) rather than at ``setup``: a run refused at start-up (a bad input, a checkpoint that does
    not fit, a missing file) leaves no run folder behind to be mistaken for a run."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.stage = stage

    def write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, self.stage)  # once: ``already_saved``

    on_fit_start = on_validation_start = on_test_start = on_predict_start = write


class IPACLI(LightningCLI):
    """LightningCLI where the configuration given wins over a checkpoint's, ``--trainer.default_root_dir`` places the
    run, and ``--ckpt_path last`` names one run's checkpoint unambiguously (module docstring)."""

    def _parse_ckpt_path(self) -> None:
        """Leave the configuration as given. (LightningCLI would parse the checkpoint's saved hyperparameters over it,
        so that ``--model.sampling.top_p=0.5`` lost to the checkpoint's 0.9 with ``--ckpt_path FILE``.) Differences
        are printed instead (``before_instantiate_classes``)."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is None:
            return
        for args in logger_args(config):
            if config.trainer.get("default_root_dir") is not None:
                args.save_dir = str(config.trainer.default_root_dir)
        ckpt = config.get("ckpt_path")
        if ckpt == "last":
            resolve_last(config)
        elif ckpt and ckpt not in ("best", "hpc", "registry") and not Path(ckpt).is_file():
            what = "a folder, not a checkpoint file" if Path(ckpt).is_dir() else "no such file"
            raise SystemExit(f"--ckpt_path {ckpt}: {what}; pass a .ckpt file (a run's checkpoints/last.ckpt) or `last`")
        if config.get("ckpt_path") and Path(config.ckpt_path).is_file():
            checkpoint = torch.load(config.ckpt_path, map_location="cpu", weights_only=False, mmap=True)  # tensors left unread
            if self.subcommand == "fit":
                refuse_finished(config, checkpoint)
                continue_run(config)
            print_differences(self.subcommand, config, checkpoint)
        elif self.subcommand == "fit":
            refuse_occupied(config)
        if self.subcommand == "fit":
            self.save_config_kwargs["config_filename"] = config_name(config)
            no_limit = config.trainer.get("max_steps") in (None, -1) and config.trainer.get("max_epochs") is None
            if config.model.get("max_rollouts") is not None and no_limit:
                config.trainer.max_epochs = -1  # max_rollouts ends the run (else Lightning caps it at 1000 epochs, warning)

    def instantiate_classes(self) -> None:
        """LightningCLI's; an error a class raised while being built (e.g. ``no such folder: PATH`` from
        ``resolve_pretrained``) is raised as it is, not inside jsonargparse's "Does not validate against any of the
        Union subtypes", which options typed ``Union[...]``/``Optional[...]`` (``model.base``, ``model.evaluation``) give."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = constructor_error(error)
            if cause is None:
                raise
            cause.__suppress_context__ = True  # the Union message only repeats it among errors about the other subtypes
            raise cause


UNION_ERROR = "Does not validate against any of the Union subtypes"


MISMATCH = re.compile(r"does not correspond to a subclass of|^Expected a <class 'NoneType'>|^Not a valid subclass")


def constructor_error(error: BaseException) -> Optional[BaseException]:
    """The error under jsonargparse's Union message that a class's own code raised (None: there is none).

    jsonargparse chains the error of the first subtype it tried: the class given, for a ``Union[LocalBase, RemoteBase]``
    given a ``LocalBase`` or an ``Optional[X]`` given an X (unions nest: an optional class inside another). For a later
    subtype (a ``RemoteBase``) the error is the one in the message's list that is not about a subtype not given.
    """
    if not str(error).startswith(UNION_ERROR):
        return None
    cause = error.__cause__
    while cause is not None and str(cause).startswith(UNION_ERROR):
        cause = cause.__cause__
    frames = traceback.extract_tb(cause.__traceback__) if cause is not None else []
    if frames and "jsonargparse" not in Path(frames[-1].filename).parts:
        return cause
    block = str(error).partition("\nErrors:\n")[2].partition("\nGiven value type:")[0]
    entries = [entry.replace("\n    ", "\n") for entry in re.findall(r"^  - (.*(?:\n    .*)*)", block, re.M)]
    others = [entry for entry in entries if not MISMATCH.search(entry)]
    return ValueError(others[0]) if len(others) == 1 and not others[0].startswith(UNION_ERROR) else None


def logger_args(config) -> list[Any]:
    """The ``init_args`` of each configured logger that has a ``save_dir`` (TensorBoard, CSV, ...)."""
    loggers = config.trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    return [lg.init_args for lg in loggers if lg and not isinstance(lg, bool) and "init_args" in lg and "save_dir" in lg.init_args]


def runs_of(args) -> Path:
    """``save_dir/name``: where a logger's ``version_N`` run folders are."""
    return Path(args.save_dir) / (args.get("name") or "lightning_logs")


def version_folder(args) -> Optional[Path]:
    """The run folder of a logger's given ``version`` (None: none given, the logger takes the next)."""
    version = args.get("version")
    return None if version is None else runs_of(args) / (version if isinstance(version, str) else f"version_{version}")


def run_folder(config) -> Optional[Path]:
    """Where this run writes ``config.yaml`` and ``checkpoints/``, if known before it starts: the logger's given
    version, or without a logger ``trainer.default_root_dir`` (Lightning's default: the working directory)."""
    args = next(iter(logger_args(config)), None)
    if args is not None:
        return version_folder(args)
    if not config.trainer.get("logger"):
        return Path(config.trainer.get("default_root_dir") or ".")
    return None


def training_runs(runs: Path) -> list[Path]:
    """The training runs in ``save_dir/name``, oldest first: ``version_N`` folders with a ``config.yaml`` (written by
    ``fit`` once it starts; validate/test/predict write ``config.<subcommand>.yaml``) or checkpoints."""
    found = [p for p in runs.glob("version_*") if p.name.removeprefix("version_").isdigit()]
    found = [p for p in found if (p / "config.yaml").is_file() or (p / "checkpoints").is_dir()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("version_")))


def resolve_last(config) -> None:
    """``--ckpt_path last``: the ``last.ckpt`` of ``--trainer.logger.init_args.version`` if given, else of the newest
    training run (without a logger: ``default_root_dir/checkpoints/last.ckpt``). Raises SystemExit when that run
    has none (say a run killed before its first checkpoint), naming the runs that have one: never another run's."""
    args = next(iter(logger_args(config)), None)
    if args is None:
        if config.trainer.get("logger"):
            return  # a logger without folders: Lightning resolves "last" itself
        last = Path(config.trainer.get("default_root_dir") or ".") / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise SystemExit(f"--ckpt_path last: no {last} (no logger: checkpoints go to default_root_dir/checkpoints); pass a checkpoint path")
        config.ckpt_path = str(last)
        print(f"--ckpt_path last: {last}")
        return
    runs = training_runs(runs_of(args))
    run = version_folder(args) or (runs[-1] if runs else None)
    if run is None:
        raise SystemExit(f"--ckpt_path last: no training run in {runs_of(args)}; run `fit` first or pass a checkpoint path")
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        why = "no such run" if not run.is_dir() else "stopped before its first checkpoint?" if run in runs else "not a training run"
        others = [f"{r / 'checkpoints' / 'last.ckpt'}" for r in runs if (r / "checkpoints" / "last.ckpt").is_file()]
        listing = ("runs with a checkpoint:\n  " + "\n  ".join(others)) if others else "no run there has a checkpoint"
        raise SystemExit(
            f"--ckpt_path last: {run} has no checkpoints/last.ckpt ({why}); {listing}\n"
            f"Pass one of them as --ckpt_path, or pick a run with --trainer.logger.init_args.version=N, or start afresh without --ckpt_path"
        )
    config.ckpt_path = str(last)
    print(f"--ckpt_path last: {last}")


def continue_run(config) -> None:
    """``fit`` from a checkpoint of a run in the TensorBoard logger's ``save_dir/name``: the logger continues that run's
    folder (its curves go on in a new events file, its ``last.ckpt`` is updated), unless a ``version`` is given.
    Other loggers start a new folder (CSVLogger would replace the run's ``metrics.csv``)."""
    args = next(iter(logger_args(config)), None)
    if args is None or args.get("version") is not None:
        return
    run = Path(config.ckpt_path).resolve().parents[1]
    if run.parent != runs_of(args).resolve() or not run.name.startswith("version_"):
        return
    if not str(config.trainer.logger.get("class_path", "")).endswith("TensorBoardLogger"):
        print(f"Resuming {run}'s checkpoint in a new run folder: {config.trainer.logger.class_path} would overwrite its logs")
        return
    number = run.name.removeprefix("version_")
    args.version = int(number) if number.isdigit() else run.name
    print(f"Resuming {run}")


def refuse_finished(config, checkpoint: dict[str, Any]) -> None:
    """``fit`` from a checkpoint already at ``model.max_rollouts`` (or ``trainer.max_steps``) would stop at once: refuse,
    saying how to train on."""
    max_rollouts = config.model.get("max_rollouts")
    if max_rollouts is not None and "fit_loop" in checkpoint.get("loops", {}):
        done = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]  # callbacks.completed_rollouts
        if done >= max_rollouts:
            raise SystemExit(
                f"{config.ckpt_path} is at rollout {done}, and --model.max_rollouts is {max_rollouts}: nothing to train. "
                f"Raise --model.max_rollouts to train on, or use validate/test/predict with this checkpoint"
            )
        return
    step, max_steps = checkpoint.get("global_step", 0), config.trainer.get("max_steps", -1)
    if max_steps is not None and max_steps != -1 and step >= max_steps:
        raise SystemExit(
            f"{config.ckpt_path} is at step {step}, and --trainer.max_steps is {max_steps}: nothing to train. "
            f"Raise --trainer.max_steps to train on, or use validate/test/predict with this checkpoint"
        )


def refuse_occupied(config) -> None:
    """A fresh ``fit`` into a folder that already holds a run (a ``version`` given, or no logger) would mix the two and
    overwrite its ``config.yaml``: refuse, saying how to resume it or start elsewhere."""
    folder = run_folder(config)
    if folder is not None and ((folder / "config.yaml").is_file() or (folder / "checkpoints").is_dir()):
        raise SystemExit(
            f"{folder} already holds a run: resume it with --ckpt_path last, or start this one elsewhere "
            f"(another --trainer.logger.init_args.version, or --trainer.default_root_dir)"
        )


def config_name(config) -> str:
    """``config.yaml`` for a new run; a resumed one keeps its ``config.yaml`` and writes its own beside it as ``config.resume<K>.yaml``."""
    folder = run_folder(config)
    if folder is None or not (folder / "config.yaml").is_file():
        return "config.yaml"
    k = 1
    while (folder / f"config.resume{k}.yaml").exists():
        k += 1
    return f"config.resume{k}.yaml"


TRAINING_STATE = (
    "model.lr", "model.head_lr", "model.weight_decay", "model.lr_scheduler", "model.algorithm.kl_coef", "model.algorithm.kl_loss_coef",
)


def print_differences(subcommand: str, config, checkpoint: dict[str, Any]) -> None:
    """Print where the configuration given and the checkpoint's saved hyperparameters (model and data) differ.

    The configuration given is what runs; but ``fit`` continues the checkpoint's training state (the optimizer's
    learning rates and weight decay, the scheduler, the KL coefficients), so those are listed apart, and
    left out for the other subcommands, which do not train.
    """
    data = config.data.get("init_args") if "init_args" in config.data else config.data
    differences = config_differences(checkpoint.get("hyper_parameters", {}), config.model.as_dict())
    differences += config_differences(checkpoint.get("datamodule_hyper_parameters", {}), data.as_dict(), "data.")
    state = [d for d in differences if d.split(":")[0].startswith(TRAINING_STATE)]
    used = [d for d in differences if d not in state]
    lines = [f"The configuration given differs from {config.ckpt_path}'s:"] if used or (state and subcommand == "fit") else []
    if used:
        lines += ["  used as given:", *(f"    {d}" for d in used)]
    if state and subcommand == "fit":
        lines += ["  training state, continued from the checkpoint (the given values apply to fresh runs):", *(f"    {d}" for d in state)]
    if lines:
        print("\n".join(lines))


def config_differences(saved: dict[str, Any], given: dict[str, Any], prefix: str = "model.") -> list[str]:
    """``key: given (checkpoint: saved)`` for each setting where the checkpoint's saved hyperparameters and the given ones differ."""
    lines = []
    for key in sorted(set(saved) | set(given)):
        if key.startswith("_"):
            continue
        a, b = saved.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and a.get("class_path", None) == b.get("class_path", None):
            lines += config_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            lines.append(f"{prefix}{key}: {b!r} (checkpoint: {a!r})")
    return [line.replace(".init_args.", ".") for line in lines]


def default_config(args: list[str]) -> dict[str, Any]:
    """Parser arguments that make ``conf/quickstart.yaml`` the defaults of a subcommand given no ``--config`` of its
    own: jsonargparse's ``default_config_files``, so that ``--help`` shows the values the subcommand really uses."""
    has_config = any(a in ("-c", "--config") or a.startswith("--config=") for a in args)
    if not args or args[0] not in SUBCOMMANDS or has_config:
        return {}
    if not DEFAULT_CONFIG.is_file():
        raise SystemExit(f"no --config given and the default {DEFAULT_CONFIG} is missing")
    return {args[0]: {"default_config_files": [glob.escape(str(DEFAULT_CONFIG))]}}  # jsonargparse globs them


def main(args: Optional[list[str]] = None, run: bool = True) -> Optional[IPACLI]:
    """Run the CLI on ``args`` (default: the command line); returns it for tests and notebooks.

    ``distill ...`` runs ``fit ...`` of a ``DistillModule`` (its config names a teacher, a student and an output folder);
    ``export ...`` writes a checkpoint's adapter for transformers (``export.export_adapter``) and returns None.
    A run stopped by SIGTERM (after saving ``last.ckpt``) exits with status 143 (128 + SIGTERM), so that a scheduler
    sees it unfinished.
    """
    given = list(sys.argv[1:] if args is None else args)
    if given and given[0] == "export":  # not a Trainer run: a checkpoint's adapter written for transformers
        from jsonargparse import CLI

        from .export import export_adapter

        CLI(export_adapter, args=given[1:], as_positional=False, prog="python -m lightning_ipa export")
        return None
    distill = bool(given) and given[0] == "distill"
    given = ["fit", *given[1:]] if distill else given
    if args is None:
        sys.argv[1:] = given  # LightningCLI reads the command line itself
    else:
        args = given
    subcommand = given[0] if given and given[0] in SUBCOMMANDS else "fit"
    try:
        return IPACLI(
            DistillModule if distill else IPAModule,
            PromptDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,
            parser_kwargs={"parser_mode": "omegaconf", "prog": "python -m lightning_ipa", "description": DESCRIPTION,
                           **({} if distill else default_config(given))},
            # fit's configuration is the run's config.yaml; the other subcommands' sit beside their results
            save_config_kwargs={"overwrite": True, "config_filename": "config.yaml" if subcommand == "fit" else f"config.{subcommand}.yaml"},
            auto_configure_optimizers=False,  # the module builds its own (two learning rates, model.lr_scheduler)
            args=args,
            run=run,
        )
    except SIGTERMException:  # Lightning stopped at a rollout boundary; RolloutCheckpoint saved it
        raise SystemExit(128 + signal.SIGTERM) from None  # 143, as a process killed by SIGTERM: the run did not finish
