"""TextClassifier pooling and TextClassificationTask: loss, GLUE metrics, training a few steps with adapters."""

from __future__ import annotations

import pytest
import torch

import modalpeft as mp
from modalpeft.text import tiny_model
from modalpeft.text.data import TextDataModule
from modalpeft.text.tasks import TextClassificationTask, TextClassifier, text_classifier

from .fixtures import cpu_trainer, write_glue_sst, write_tiny_model


@pytest.mark.parametrize(("arch", "pooling"), [("bert", "mean"), ("bert", "pooler"), ("t5", "mean"), ("llama", "last")])
def test_classifier_pools_each_architecture(arch, pooling) -> None:
    clf = TextClassifier(tiny_model(arch), 3, pooling)
    ids = torch.randint(5, 100, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    out = clf(ids, mask, token_type_ids=torch.zeros_like(ids))  # dropped where the model takes none
    assert out.shape == (2, 3)
    ids2 = ids.clone()
    ids2[1, 4:] = 7  # padding content never matters
    if pooling != "pooler":
        torch.testing.assert_close(clf(ids2, mask)[1], out[1])


def test_pooler_missing_and_bad_pooling() -> None:
    with pytest.raises(ValueError, match="has no pooler"):
        TextClassifier(tiny_model("llama"), 2, "pooler")(torch.randint(0, 100, (1, 4)))
    with pytest.raises(ValueError, match="pooling='cls'"):
        TextClassifier(tiny_model("bert"), 2, "cls")


def test_metric_choices() -> None:
    task = TextClassificationTask(TextClassifier(tiny_model("bert"), 2), 2, metrics=["accuracy", "f1", "mcc"])
    assert set(task.val_metrics) == {"val/accuracy", "val/f1", "val/mcc"}
    with pytest.raises(ValueError, match=r"\['pearson'\] cannot be used with num_classes=2"):
        TextClassificationTask(TextClassifier(tiny_model("bert"), 2), 2, metrics=["pearson"])
    reg = TextClassificationTask(TextClassifier(tiny_model("bert"), 1), 1)
    assert set(reg.val_metrics) == {"val/pearson", "val/spearman"}


@pytest.mark.parametrize(
    "adapter", ["linear", mp.ParallelAdapterConfig(bottleneck_dim=4), mp.CompacterConfig(reduction_factor=4)]
)
def test_fit_a_few_steps(adapter, tmp_path) -> None:
    model_dir = write_tiny_model(tmp_path / "model")
    data = TextDataModule(str(write_glue_sst(tmp_path / "sst")), tokenizer=str(model_dir), batch_size=4, max_length=16)
    task = TextClassificationTask(text_classifier(str(model_dir), 2), 2, adapter=adapter, lr=1e-2)
    trainer = cpu_trainer(tmp_path)
    trainer.fit(task, datamodule=data)
    metrics = trainer.validate(task, datamodule=data, verbose=False)[0]
    assert 0.0 <= metrics["val/accuracy"] <= 1.0 and "val/f1" in metrics


def test_head_lr_reaches_the_default_head(tmp_path) -> None:
    """``modules_to_save=None`` means ``["head"]`` here: ``head_lr`` must find that head (the hparams keep None)."""
    model_dir = write_tiny_model(tmp_path / "model")
    data = TextDataModule(str(write_glue_sst(tmp_path / "sst")), tokenizer=str(model_dir), batch_size=4, max_length=16)
    task = TextClassificationTask(
        text_classifier(str(model_dir), 2), 2, adapter=mp.ParallelAdapterConfig(bottleneck_dim=4), lr=1e-3, head_lr=0.5
    )
    cpu_trainer(tmp_path).fit(task, datamodule=data)
    head = {id(p) for p in task.model.base_model.head.parameters()}
    groups = task.trainer.optimizers[0].param_groups
    assert {g["initial_lr"] for g in groups if {id(p) for p in g["params"]} <= head} == {0.5}
    assert {g["initial_lr"] for g in groups if not {id(p) for p in g["params"]} & head} == {1e-3}
    assert sum(len(g["params"]) for g in groups if {id(p) for p in g["params"]} <= head) == 2
