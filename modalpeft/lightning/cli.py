"""``cli_main``: the LightningCLI every ``recipes/<modality>.py`` and ``modalpeft fit ...`` use."""

from __future__ import annotations

import importlib.util
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


class SafeLightningCLI(LightningCLI):
    """LightningCLI that loads every ``--ckpt_path`` with ``weights_only=True``, explicitly: neither torch's default
    nor ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` decides whether a checkpoint may run code, and ``--weights_only=false``
    is refused."""

    def _weights_only(self) -> None:
        arguments = self.config_init[self.subcommand]
        if arguments.get("weights_only") is False:
            raise ValueError(
                "--weights_only=false is not allowed: modalpeft never unpickles arbitrary code. Checkpoints written by "
                "modalpeft's tasks load with weights_only=True; convert another checkpoint to plain tensors first."
            )
        arguments["weights_only"] = True

    before_fit = before_validate = before_test = before_predict = _weights_only


def cli_main(
    args: ArgsType = None,
    model_class: type[pl.LightningModule] = AdapterTask,
    datamodule_class: type[pl.LightningDataModule] | None = None,
    run: bool = True,
) -> SafeLightningCLI:
    """Run LightningCLI (``fit``/``validate``/``test``/``predict``) on a task and data module.

    Any subclass of ``model_class`` / ``datamodule_class`` can be chosen in YAML by ``class_path``. The
    defaults: Rich progress bar, CSV logger (and TensorBoard when installed) under ``outputs/``, and the
    adapter exported at the end of ``fit``; checkpoints load with ``weights_only=True`` (:class:`SafeLightningCLI`).
    ``args`` lets tests call it without a shell.
    """
    from jsonargparse import set_parsing_settings
    from peft import PeftConfig

    from ..core.config import AdapterConfig

    # method configs are dataclasses; let YAML pick any subclass by class_path (BottleneckConfig, LoraConfig, ...)
    set_parsing_settings(subclasses_enabled=[AdapterConfig, PeftConfig])
    trainer_defaults = {
        "callbacks": [RichProgressBar()],
        "logger": default_loggers(),
    }
    return SafeLightningCLI(
        model_class,
        datamodule_class or pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
