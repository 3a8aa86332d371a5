"""SoRA: placement and counts, the gated branch and its merge, the official SparseAdamW step transcribed, the L1
term, and pruning into a smaller adapter that saves, loads and merges."""

from __future__ import annotations

import math

import pytest
import torch

import modalpeft as mp
from modalpeft.core.inject import hosts
from modalpeft.text import tiny_model
from modalpeft.text.methods.sora import GateAdamW, gate_l1_penalty, gates, prune_sora

from ..core.toy_models import MLP


def official_sparse_adamw_step(p, grad, state, lr, xi, eps=1e-6, betas=(0.9, 0.999), wd=0.0):
    """TsinghuaC3I/SoRA ``src/sparse_optimizer.py::SparseAdamW.step`` for one parameter (transcribed)."""
    if not state:
        state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    beta1, beta2 = betas
    state["step"] += 1
    exp_avg.mul_(beta1).add_(grad, alpha=(1.0 - beta1))
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    step_size = lr * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
    to_add = torch.div(exp_avg, denom) * (-step_size)
    if wd > 0.0:
        to_add = to_add + (-lr * wd) * p
    p.add_(to_add)
    if xi > 0:
        p[p > xi] -= xi
        p[p < -xi] += xi
        p[abs(p) < xi] = 0.0


def test_gate_optimizer_equals_the_official_step() -> None:
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(1, 16) * 0.01)
    ref, state = ours.detach().clone(), {}
    opt = GateAdamW([ours], lr=1e-3, threshold=2e-3, weight_decay=0.01)
    for _ in range(5):
        grad = torch.randn(1, 16)
        ours.grad = grad.clone()
        opt.step()
        official_sparse_adamw_step(ref, grad, state, lr=1e-3, xi=2e-3, wd=0.01)
        torch.testing.assert_close(ours.detach(), ref, atol=0, rtol=0)
    assert (ours == 0).any()  # small gates were switched off


def test_official_threshold_zeroes_below_twice_xi() -> None:
    """The documented difference from the paper's soft-threshold: 1.5ξ goes to 0, 3ξ to 2ξ."""
    p = torch.nn.Parameter(torch.tensor([[1.5, 3.0, -1.5, -3.0, 0.5]]))
    opt = GateAdamW([p], lr=0.0, threshold=1.0)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert p.detach().tolist() == [[0.0, 2.0, 0.0, -2.0, 0.0]]


def test_placement_counts_and_branch() -> None:
    model = mp.adapt(tiny_model("bert"), mp.SoRAConfig(rank=4, init_weights=False))
    names = [n for n, _ in hosts(model.base_model)]
    assert len(names) == 12 and names[0] == "encoder.layer.0.attention.self.query"  # q, k, v, o, ffn in, ffn out
    # per layer: 4 x (32 + 32) + (32 + 64) + (64 + 32) Linears' d_in + d_out, times r = 4, plus 4 gate entries each
    assert model.trainable_summary()["trainable"] == 2 * (4 * (4 * 64 + 2 * 96) + 6 * 4)
    host = model.base_model.encoder.layer[0].attention.self.query
    adapter = host.adapters["default"]
    assert adapter.scaling == 16.0 / 4
    x = torch.randn(3, 32)
    expected = host.base_layer(x) + ((x @ adapter.A.T).mul(adapter.gate) @ adapter.B.T) * adapter.scaling
    torch.testing.assert_close(host(x), expected)  # official LowRankLinear.forward


def test_unknown_architecture_and_bad_config() -> None:
    with pytest.raises(ValueError, match="sora: found no transformer blocks in MLP"):
        mp.adapt(MLP(), mp.SoRAConfig())
    assert mp.adapt(MLP(), mp.SoRAConfig(target_modules=["fc1"])).trainable_summary()["trainable"] == 8 * 48 + 8
    with pytest.raises(ValueError, match=r"rank_pattern entries \{'x': 9\}"):
        mp.SoRAConfig(rank=8, rank_pattern={"x": 9})


def test_l1_penalty_is_the_official_mean() -> None:
    model = mp.adapt(tiny_model("bert"), mp.SoRAConfig(rank=4))
    g = gates(model)
    expected = 10.0 * sum(p.abs().sum() for p in g) / sum(p.numel() for p in g)
    torch.testing.assert_close(gate_l1_penalty(model, 10.0), expected)


def test_pruning_keeps_the_function_and_saves_loads_merges(tmp_path) -> None:
    model = mp.adapt(tiny_model("bert"), mp.SoRAConfig(rank=4, init_weights=False))
    with torch.no_grad():
        for i, g in enumerate(gates(model)):
            g[0, : i % 5] = 0.0  # 0..4 zero gates per module; a module with all 4 zero loses its adapter
    ids = torch.randint(2, 100, (2, 6))
    before = model(input_ids=ids).last_hidden_state
    full = model.trainable_summary()["trainable"]
    pattern = prune_sora(model)
    assert sorted(set(pattern.values())) == [0, 1, 2, 3, 4] and model.peft_config["default"].rank_pattern == pattern
    assert model.trainable_summary()["trainable"] < full
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, before, atol=1e-6, rtol=0)
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(tiny_model("bert"), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, before, atol=1e-6, rtol=0)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, before, atol=1e-5, rtol=1e-5)


def test_the_lightning_task_uses_the_gate_optimizer_and_the_l1_term(tmp_path) -> None:
    import pytorch_lightning as pl

    from modalpeft.text.data import TextDataModule
    from modalpeft.text.tasks import TextClassificationTask, text_classifier

    from .fixtures import write_glue_sst, write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model")
    data = TextDataModule(str(write_glue_sst(tmp_path / "sst")), tokenizer=str(model_dir), batch_size=4, max_length=16)
    config = mp.SoRAConfig(rank=4, gate_threshold=0.5, gate_lr=0.1)
    task = TextClassificationTask(text_classifier(str(model_dir), 2), 2, adapter=config, lr=1e-3, weight_decay=0.1)
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    trainer.fit(task, datamodule=data)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, GateAdamW)
    gate_group = optimizer.param_groups[-1]
    assert gate_group["threshold"] == 0.5 and gate_group["weight_decay"] == 0.0
    assert {id(p) for p in gate_group["params"]} == {id(g) for g in gates(task.model)}
    assert all(g["threshold"] == 0.0 for g in optimizer.param_groups[:-1])
    assert (torch.cat([g.detach().flatten() for g in gates(task.model)]) == 0).any()  # ranks switched off
    assert "train/penalty" in trainer.callback_metrics


def test_base_sized_count_matches_the_spec() -> None:
    """Spec §7f: r_max = 8 on the six Linears of 12 layers of width 768 / FFN 3,072 (DeBERTaV3-base's shapes;
    RoBERTa-base has the same) = 1,327,104 + 576 gates = 1,327,680."""
    from .test_bottleneck import roberta_base_on_meta

    model = mp.adapt(roberta_base_on_meta(), mp.SoRAConfig(rank=8))
    assert model.trainable_summary()["trainable"] == 1_327_680
