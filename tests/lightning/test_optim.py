"""The task's optimisation as it runs in a Trainer: the per-step cosine schedule with linear warm-up, step by step
against its formula, and SGD with momentum (and weight decay on matrices only) doing the updates."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from .test_task import data, task, trainer

LR, MIN_LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.005, 0.8, 0.01
EPOCHS, STEPS_PER_EPOCH = 3, 5  # 80 digits in batches of 16


def expected_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to ``LR`` over ``warmup`` steps (``LR * (step + 1) / warmup``), then a half cosine from ``LR``
    down to ``MIN_LR`` over the remaining ``total - warmup`` steps."""
    if step < warmup:
        return LR * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * progress)) / 2


class Record(pl.Callback):
    """Per step: the learning rate, and the head's parameters and gradients just before and after the update."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        head = pl_module.model.base_model.head
        self.steps.append(
            {
                "lr": [g["lr"] for g in optimizer.param_groups],
                "before": {n: p.detach().clone() for n, p in head.named_parameters()},
                "grad": {n: p.grad.detach().clone() for n, p in head.named_parameters()},
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        head = pl_module.model.base_model.head
        self.steps[-1]["after"] = {n: p.detach().clone() for n, p in head.named_parameters()}


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory) -> tuple[pl.LightningModule, Record]:
    pl.seed_everything(0)
    settings = dict(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, warmup_epochs=1.4, min_lr=MIN_LR)
    sgd = task(optimizer="sgd", lr=LR, scheduler="cosine", **settings)
    record = Record()
    run = trainer(tmp_path_factory.mktemp("sgd"), max_epochs=EPOCHS, limit_val_batches=0, callbacks=[record])
    run.fit(sgd, datamodule=data())
    return sgd, record


def test_cosine_schedule_with_warmup_step_by_step(sgd_run) -> None:
    _, record = sgd_run
    total = EPOCHS * STEPS_PER_EPOCH
    warmup = round(1.4 * STEPS_PER_EPOCH)  # warm-up epochs, in steps: 7
    assert len(record.steps) == total
    for step, seen in enumerate(record.steps):
        expected = expected_lr(step, total, warmup)
        assert seen["lr"] == pytest.approx([expected] * len(seen["lr"]), rel=1e-12), f"step {step}"
    assert record.steps[warmup - 1]["lr"][0] == pytest.approx(LR)  # the peak ends the warm-up
    assert record.steps[-1]["lr"][0] > MIN_LR  # the last step's rate is still above the floor it tends to


def test_sgd_with_momentum_makes_the_updates(sgd_run) -> None:
    """Each update is SGD's: ``b <- momentum * b + (g + wd * p)``, ``p <- p - lr * b``; weight decay on the head's
    matrix only (the bias is in the no-decay group)."""
    sgd, record = sgd_run
    optimizer = sgd.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.SGD
    assert all(g["momentum"] == MOMENTUM and not g["nesterov"] for g in optimizer.param_groups)
    buffers: dict[str, torch.Tensor] = {}
    for step, seen in enumerate(record.steps):
        for name, before in seen["before"].items():
            decay = WEIGHT_DECAY if before.ndim > 1 else 0.0
            gradient = seen["grad"][name] + decay * before
            buffers[name] = gradient if name not in buffers else MOMENTUM * buffers[name] + gradient
            expected = before - seen["lr"][0] * buffers[name]
            torch.testing.assert_close(seen["after"][name], expected, msg=f"{name} at step {step}")


@pytest.mark.parametrize("adapter", ["full", "peft-lora"])
def test_head_lr_trains_the_head_at_its_own_rate_under_the_schedule(adapter, tmp_path) -> None:
    """``head_lr``: the head's parameters (``modules_to_save``, also when peft wraps them) step at their own rate,
    every other trainable parameter at ``lr``, both scaled by the same warm-up/cosine factor at every step."""
    import peft

    pl.seed_everything(0)
    config = "full" if adapter == "full" else peft.LoraConfig(r=2, target_modules=["qkv"])
    run = task(config, lr=LR, head_lr=0.4, scheduler="cosine", warmup_epochs=0.4, min_lr=MIN_LR)
    seen: list[list[tuple[float, bool]]] = []

    class Rates(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            head = {id(p) for n, p in pl_module.model.named_parameters() if ".head." in f".{n}."}
            rows = [(g["lr"], [id(p) in head for p in g["params"]]) for g in optimizer.param_groups]
            assert all(len(set(flags)) == 1 for _, flags in rows), "a group mixes head and body parameters"
            seen.append([(rate, flags[0]) for rate, flags in rows])

    trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[Rates()]).fit(run, datamodule=data())
    groups = run.trainer.optimizers[0].param_groups
    trained = {id(p) for n, p in run.model.named_parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trained  # every trainable parameter, once
    assert {is_head for _, is_head in seen[0]} == {False, True}
    warmup = round(0.4 * STEPS_PER_EPOCH)
    for step, rates in enumerate(seen):
        factor = expected_lr(step, STEPS_PER_EPOCH, warmup) / LR
        for rate, is_head in rates:
            assert rate == pytest.approx((0.4 if is_head else LR) * factor, rel=1e-12), f"step {step}"


def test_head_lr_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"head_lr=0\.0 must be > 0"):
        task("full", head_lr=0.0)
