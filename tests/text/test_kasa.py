"""KaSA through peft (``LoraConfig(kasa_config=KasaConfig(...))``, peft 0.21.2): its count, its in-place truncation
of the base weights, and its regulariser added to the loss by the Lightning task."""

from __future__ import annotations

import peft
import torch

import modalpeft as mp
from modalpeft.core.peft_bridge import kasa_penalty
from modalpeft.text import tiny_model
from modalpeft.text.tasks import TextClassificationTask, TextClassifier


def kasa(**kwargs) -> peft.LoraConfig:
    return peft.LoraConfig(r=3, lora_alpha=6, target_modules=["query", "value"], kasa_config=peft.KasaConfig(**kwargs))


def test_count_and_base_truncation() -> None:
    torch.manual_seed(0)
    clf = TextClassifier(tiny_model("bert"), 2)
    query = clf.encoder.encoder.layer[0].attention.self.query.weight.detach().clone()
    model = mp.adapt(clf, kasa(), modules_to_save=["head"])
    d, layers, r = 32, 2, 3
    # LoRA's r·(d_in + d_out) plus r learnable singular values (lora_diag) per adapted Linear, + the head
    assert model.trainable_summary()["trainable"] == 2 * layers * (r * (d + d) + r) + (d * 2 + 2)
    truncated = next(m for n, m in model.named_modules() if n.endswith("layer.0.attention.self.query")).base_layer
    singular = torch.linalg.svdvals(truncated.weight.detach())
    original = torch.linalg.svdvals(query)
    torch.testing.assert_close(singular[: d - r], original[: d - r], atol=1e-4, rtol=1e-4)
    assert singular[d - r :].abs().max() < 1e-4  # the r smallest components are discarded, in place


def test_task_adds_the_kasa_regulariser() -> None:
    torch.manual_seed(0)
    task = TextClassificationTask(TextClassifier(tiny_model("bert"), 2), 2, adapter=kasa(beta=0.5, gamma=0.25))
    for module in task.model.modules():
        if hasattr(module, "lora_diag"):
            with torch.no_grad():
                for p in module.lora_diag.values():
                    p.fill_(2.0)
    penalty = kasa_penalty(task.model)
    diag = [p for m in task.model.modules() if hasattr(m, "lora_diag") for p in m.lora_diag.values()]
    assert len(diag) == 4 and float(penalty) > 0.5 * sum(float((p**2).sum()) for p in diag) - 1e-6
    batch = {"input_ids": torch.randint(5, 100, (2, 6)), "labels": torch.tensor([0, 1])}
    task.log = lambda *args, **kwargs: None  # outside a Trainer
    torch.testing.assert_close(task.training_step(batch, 0), task.step(batch, "train") + penalty)
    assert (
        kasa_penalty(mp.adapt(TextClassifier(tiny_model("bert"), 2), peft.LoraConfig(r=2, target_modules=["query"])))
        is None
    )
