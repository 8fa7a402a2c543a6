"""``python -m lightning_ipa {fit,validate,test,predict,distill}``: LightningCLI over IPAModule and a task's data.

``distill`` fits a ``DistillModule`` instead: a local proxy of a (remote) base, for IPA's black-box workflow.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningCLI

from .data import PromptDataModule
from .distill import DistillModule
from .module import IPAModule

CONF = Path(__file__).resolve().parents[1] / "conf"
DEFAULT_CONFIG = CONF / "quickstart.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class IPACLI(LightningCLI):
    """LightningCLI whose ``--ckpt_path last`` resumes the newest run of the configured logger."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is not None and config.get("ckpt_path") == "last":
            resume_last_run(config)


def resume_last_run(config) -> None:
    """Point ``ckpt_path`` at the newest ``last.ckpt`` and make the logger continue that version."""
    logger = config.trainer.logger
    args = logger.init_args if logger and not isinstance(logger, bool) and "init_args" in logger else None
    if args is None or "save_dir" not in args:
        return  # not a TensorBoard-style logger: Lightning resolves "last" itself
    run_dir = Path(args.save_dir) / (args.get("name") or "lightning_logs")
    candidates = sorted(run_dir.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit(f"--ckpt_path last: no {run_dir}/version_*/checkpoints/last.ckpt; run `fit` first or pass a checkpoint path")
    last = candidates[-1]
    config.ckpt_path = str(last)
    args.version = int(last.parents[1].name.removeprefix("version_"))
    print(f"Resuming {last}")


def with_default_config(args: list[str]) -> list[str]:
    """Add ``--config conf/quickstart.yaml`` to a subcommand given no config of its own."""
    has_config = any(a in ("-c", "--config") or a.startswith("--config=") for a in args)
    if args and args[0] in SUBCOMMANDS and not has_config and "--help" not in args and "-h" not in args:
        if not DEFAULT_CONFIG.is_file():
            raise SystemExit(f"no --config given and the default {DEFAULT_CONFIG} is missing")
        return [args[0], "--config", str(DEFAULT_CONFIG), *args[1:]]
    return args


def main(args: Optional[list[str]] = None, run: bool = True) -> IPACLI:
    """Run the CLI on ``args`` (default: the command line); returns it for tests and notebooks.

    ``distill ...`` runs ``fit ...`` of a ``DistillModule`` (its config names a teacher, a student and an output folder).
    """
    given = list(sys.argv[1:] if args is None else args)
    distill = bool(given) and given[0] == "distill"
    given = ["fit", *given[1:]] if distill else with_default_config(given)
    if args is None:
        sys.argv[1:] = given  # LightningCLI reads the command line itself
    else:
        args = given
    return IPACLI(
        DistillModule if distill else IPAModule,
        PromptDataModule,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the module builds its own (two learning rates, model.lr_scheduler)
        args=args,
        run=run,
    )
