"""``cli_main``: the LightningCLI every ``recipes/<modality>.py`` and ``modalpeft fit ...`` use."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.cli import ArgsType, LightningCLI

from .task import AdapterTask


def default_loggers(save_dir: str = "outputs") -> list[dict[str, Any]]:
    """A CSV logger, plus TensorBoard when it is installed."""
    loggers = [{"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": save_dir}}]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(
            {"class_path": "pytorch_lightning.loggers.TensorBoardLogger", "init_args": {"save_dir": save_dir}}
        )
    return loggers


class UserInputError(Exception):
    """A recipe or command-line value that cannot run; :func:`cli_main` prints its one-line message."""


def root_cause(error: BaseException) -> BaseException:
    """The first exception of a chain (jsonargparse wraps a config's own ``ValueError`` in several layers)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return error


class _NoTips(logging.Filter):
    """Drops Lightning's advertising tips (``💡 Tip: ... try installing litlogger``) from its info log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip:")


class ModalpeftCLI(LightningCLI):
    """LightningCLI that turns bad input into one-line errors before anything is written, loads every
    ``--ckpt_path`` with ``weights_only=True`` explicitly (neither torch's default nor
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` decides whether a checkpoint may run code; ``--weights_only=false`` is
    refused), and says at the end of a run where its checkpoint, logs and adapter went."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as e:
            raise UserInputError(str(root_cause(e)).strip().splitlines()[0]) from e

    def _check_ckpt_path(self) -> None:
        arguments = self.config_init[self.subcommand]
        if arguments.get("weights_only") is False:
            raise ValueError(
                "--weights_only=false is not allowed: modalpeft never unpickles arbitrary code. Checkpoints written by "
                "modalpeft's tasks load with weights_only=True; convert another checkpoint to plain tensors first."
            )
        arguments["weights_only"] = True
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).is_file():
            raise UserInputError(
                f"--ckpt_path={ckpt_path!r} is not a file; give the .ckpt that fit wrote (it prints its run folder "
                "at the end: <run folder>/checkpoints/*.ckpt)."
            )

    before_fit = before_validate = before_test = before_predict = _check_ckpt_path

    def _print_run_folder(self) -> None:
        trainer = self.trainer
        if trainer.fast_dev_run:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # on every rank: a collective under DDP
        if not trainer.is_global_zero:
            return
        lines = [f"modalpeft {self.subcommand}: run folder {folder}/"]
        checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") if self.subcommand == "fit" else ""
        if checkpoint:
            lines.append(f"  checkpoint: {checkpoint} (--ckpt_path for validate/test/predict, or to resume)")
        logs = [p.name for p in folder.glob("*") if p.suffix in (".csv", ".yaml") or p.name.startswith("events.")]
        if logs:
            lines.append(f"  logs: {', '.join(sorted(logs))}")
        adapter = folder / "adapter"
        if self.subcommand == "fit" and adapter.is_dir():
            lines.append(f"  adapter: {adapter}/ (modalpeft.load_adapter(<fresh backbone>, '{adapter}'))")
        print("\n".join(lines))

    def _finish(self) -> None:
        """Print the run folder, then close torch.distributed's process group if the run opened one (DDP): a gloo
        group still open at interpreter exit can abort a finished run ("terminate called without an active
        exception", exit status -6), seen once in CI."""
        self._print_run_folder()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    after_fit = after_validate = after_test = after_predict = _finish


def cli_main(
    args: ArgsType = None,
    model_class: type[pl.LightningModule] = AdapterTask,
    datamodule_class: type[pl.LightningDataModule] | None = None,
    run: bool = True,
) -> ModalpeftCLI:
    """Run LightningCLI (``fit``/``validate``/``test``/``predict``) on a task and data module.

    Any subclass of ``model_class`` / ``datamodule_class`` can be chosen in YAML by ``class_path``. The
    defaults: Rich progress bar, CSV logger (and TensorBoard when installed) under ``outputs/``, and the
    adapter exported at the end of ``fit``; the run folder is printed at the end; checkpoints load with
    ``weights_only=True`` (:class:`ModalpeftCLI`). ``args`` lets tests call it without a shell. A value a config
    refuses (``bottleneck_dim=0``) or a ``--ckpt_path`` that is not a file prints ``error: <cause and fix>`` and
    exits with status 2 before anything is written.
    """
    from jsonargparse import set_parsing_settings
    from lightning_utilities.core import rank_zero
    from peft import PeftConfig

    from ..core.config import AdapterConfig

    # method configs are dataclasses; let YAML pick any subclass by class_path (BottleneckConfig, LoraConfig, ...)
    set_parsing_settings(subclasses_enabled=[AdapterConfig, PeftConfig])
    if not any(isinstance(f, _NoTips) for f in rank_zero.log.filters):
        rank_zero.log.addFilter(_NoTips())
    trainer_defaults = {
        "callbacks": [RichProgressBar()],
        "logger": default_loggers(),
    }
    try:
        return ModalpeftCLI(
            model_class,
            datamodule_class or pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except UserInputError as e:
        command = Path(sys.argv[0]).name if args is None else "modalpeft"
        command = "modalpeft" if command == "__main__.py" else command
        print(f"{command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
