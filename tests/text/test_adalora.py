"""peft's AdaLoRA through the text task: the Lightning loop drives its budget schedule (update_and_allocate after
each optimiser step) and adds its orthogonal regulariser, which peft adds only to a loss the model returns."""

from __future__ import annotations

import peft
import pytorch_lightning as pl
import torch

from modalpeft.core.peft_bridge import adalora_orthogonal_penalty, adalora_tuner
from modalpeft.text.data import TextDataModule
from modalpeft.text.tasks import TextClassificationTask, text_classifier

from .fixtures import write_glue_sst, write_tiny_model


def test_adalora_budget_is_allocated_by_the_lightning_loop(tmp_path, monkeypatch) -> None:
    model_dir = write_tiny_model(tmp_path / "model")
    data = TextDataModule(str(write_glue_sst(tmp_path / "sst")), tokenizer=str(model_dir), batch_size=4, max_length=16)
    config = peft.AdaLoraConfig(
        init_r=4, target_r=1, tinit=1, tfinal=1, deltaT=1, total_step=6, target_modules=["query", "value"]
    )
    task = TextClassificationTask(text_classifier(str(model_dir), 2), 2, adapter=config, lr=1e-2)
    tuner = adalora_tuner(task.model)
    assert tuner is not None
    steps = []
    original = tuner.update_and_allocate
    monkeypatch.setattr(tuner, "update_and_allocate", lambda step: (steps.append(step), original(step))[1])
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    trainer.fit(task, datamodule=data)
    assert steps == [0, 1, 2, 3, 4, 5]
    ranks = [int((m.lora_E["default"] != 0).sum()) for m in tuner.model.modules() if hasattr(m, "lora_E")]
    assert ranks and sum(ranks) < 4 * len(ranks)  # the budget went from init_r 4 towards target_r 1
    assert "train/penalty" in trainer.callback_metrics


def test_orthogonal_penalty_matches_peft_forward() -> None:
    from modalpeft.text import tiny_model

    model = peft.get_peft_model(
        tiny_model("bert"), peft.AdaLoraConfig(init_r=4, total_step=10, target_modules=["query"], orth_reg_weight=0.3)
    )
    tuner = model.base_model
    expected, n = 0.0, 0
    for key, p in tuner.model.named_parameters():
        if ("lora_A" in key or "lora_B" in key) and "default" in key:
            cov = p @ p.T if "lora_A" in key else p.T @ p
            expected, n = expected + torch.norm(cov - torch.eye(*cov.shape), p="fro"), n + 1
    torch.testing.assert_close(adalora_orthogonal_penalty(tuner), 0.3 * expected / n)
