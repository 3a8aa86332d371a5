"""Lightning checkpoints never unpickle code: one with a pickled object in it is refused, by ``Trainer.fit`` on a
task and by the CLI (also when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` asks torch to unpickle), and nothing runs."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from modalpeft.lightning import cli_main

from .test_cli import RECIPE, TINY
from .test_task import data, task, trainer


class CreatesAFile:
    """Unpickling this creates ``path``: a harmless stand-in for a payload that runs code when it is loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A checkpoint of a one-epoch run, the same with a pickled payload, and the file the payload would create."""
    root = tmp_path_factory.mktemp("checkpoints")
    pl.seed_everything(0)
    trainer(root / "run", max_epochs=1, limit_val_batches=1).fit(task(), datamodule=data())
    clean = next((root / "run").rglob("*.ckpt"))
    payload = torch.load(clean, weights_only=True)
    marker = root / "payload-ran"
    payload["hyper_parameters"]["note"] = CreatesAFile(marker)
    evil = root / "evil.ckpt"
    torch.save(payload, evil)
    assert not marker.exists()
    return clean, evil, marker


def test_a_task_resumes_from_a_clean_checkpoint_but_refuses_a_pickled_payload(checkpoints, tmp_path) -> None:
    clean, evil, marker = checkpoints
    trainer(tmp_path / "clean", max_epochs=2, limit_val_batches=1).fit(task(), datamodule=data(), ckpt_path=clean)
    with pytest.raises(
        pickle.UnpicklingError, match=r"(?s)Weights only load failed.*Unsupported global: GLOBAL io.open"
    ):
        trainer(tmp_path / "evil", max_epochs=2).fit(task(), datamodule=data(), ckpt_path=evil)
    assert not marker.exists()


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_the_cli_refuses_a_pickled_payload_even_when_torch_is_told_to_unpickle(
    subcommand, checkpoints, tmp_path, monkeypatch
) -> None:
    """``--ckpt_path=last`` is found by the checkpoint callback and loaded by the Trainer only (LightningCLI's own
    reading of ``--ckpt_path`` files for hyper-parameters does not see it): ``weights_only`` must be explicit there."""
    _, evil, marker = checkpoints
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load's default becomes weights_only=False
    (tmp_path / "checkpoints").mkdir()
    shutil.copyfile(evil, tmp_path / "checkpoints" / "last.ckpt")
    args = [subcommand, "--config", str(RECIPE), *TINY, "--trainer.max_epochs=2", "--trainer.limit_val_batches=1"]
    args += ["--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={tmp_path / 'checkpoints'}"]
    args += ["--ckpt_path=last", f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        cli_main(args)
    assert not marker.exists()
    with pytest.raises(ValueError, match="--weights_only=false is not allowed"):
        cli_main([*args, "--weights_only=false"])
    assert not marker.exists()
