"""MWA (``MetricWeightedAveraging``): the weights, both averaging modes, the errors, and a Lightning run."""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import modalpeft as mp
from modalpeft.lightning import MetricWeightedAveraging
from modalpeft.lightning.mwa import average_states, merge_adapter_dirs, mwa_weights

from .test_task import backbone, data, task, trainer


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def saves(config, n: int = 3, seed: int = 0) -> tuple[mp.AdaptedModel, list[dict[str, torch.Tensor]]]:
    """A model adapted with ``config`` and ``n`` random adapter states for it (as if saved along a run)."""
    model = mp.adapt(mlp(), config)
    g = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(n):
        state = model.adapter_state_dict()
        states.append(
            {k: v + torch.randn(v.shape, generator=g) * 0.3 if v.is_floating_point() else v for k, v in state.items()}
        )
    return model, states


def test_weights_follow_the_metric_with_one_penalty() -> None:
    assert mwa_weights([0.5, 1.0, 2.0], penalty=0.0) == pytest.approx([1 / 3] * 3)  # p = 0: uniform
    assert mwa_weights([0.5, 1.0, 2.0], penalty=3.0, uniform=True) == pytest.approx([1 / 3] * 3)
    loss = mwa_weights([1.0, 2.0, 4.0], penalty=1.0)  # w ∝ 1/loss
    assert loss == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    steps = mwa_weights([100, 200, 300], penalty=2.0, metric_mode="max")  # w ∝ step²
    assert steps == pytest.approx([1 / 14, 4 / 14, 9 / 14])
    sharp = mwa_weights([1.0, 1.1, 3.0], penalty=50.0)
    assert sharp[0] > 0.99 and math.isclose(sum(sharp), 1.0)


@pytest.mark.parametrize(
    ("metrics", "kwargs", "match"),
    [
        ([], {}, "at least one"),
        ([1.0, -2.0], {}, r"positive, finite metrics, got \[-2.0\]"),
        ([1.0], {"penalty": -1.0}, "penalty=-1.0"),
        ([1.0], {"metric_mode": "lowest"}, "metric_mode='lowest'"),
    ],
)
def test_bad_weights_input_is_refused(metrics, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        mwa_weights(metrics, **kwargs)


def test_factors_mode_averages_every_saved_tensor(tmp_path) -> None:
    model, states = saves(mp.MTLoRAConfig(structure="CTCM", rank=2, init_weights=False))
    weights = [0.2, 0.3, 0.5]
    averaged = average_states(states, weights)
    for key in states[0]:
        torch.testing.assert_close(averaged[key], sum(w * s[key] for w, s in zip(weights, states, strict=True)))
    dirs = []
    for i, state in enumerate(states):
        one = copy.deepcopy(model)
        one.load_adapter_state(state, "default")
        one.save_adapter(tmp_path / f"save{i}")
        dirs.append(tmp_path / f"save{i}")
    got = merge_adapter_dirs(mlp(), dirs, [4.0, 2.0, 1.0], tmp_path / "merged", mode="factors", penalty=1.0)
    assert got == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    loaded = mp.load_adapter(mlp(), tmp_path / "merged")  # an ordinary adapter directory of the same method
    assert loaded.peft_config["default"].method == "mtlora"
    expected = average_states(states, got)
    for key, value in loaded.adapter_state_dict().items():
        torch.testing.assert_close(value, expected[key])
    assert json.loads((tmp_path / "merged" / "mwa.json").read_text())["weights"] == pytest.approx(got)


@pytest.mark.parametrize(
    "config",
    [
        mp.MTLoRAConfig(structure="ICFM", rank=2, init_weights=False),
        mp.NeuroAdaConfig(k=2, init_weights=False),
        peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False),
    ],
    ids=["mtlora", "neuroada", "peft_lora"],
)
def test_delta_mode_equals_the_weighted_mean_of_the_merged_models(config, tmp_path) -> None:
    model, states = saves(config)
    weights = mwa_weights([3.0, 1.5, 2.0], penalty=2.0)
    merged_models = []
    for state in states:
        one = copy.deepcopy(model)
        one.load_adapter_state(state, one.active_adapter)
        merged_models.append(one.merge_and_unload().state_dict())
    mean = {k: sum(w * m[k] for w, m in zip(weights, merged_models, strict=True)) for k in merged_models[0]}
    from modalpeft.lightning.mwa import write_merged

    write_merged(model, states, weights, tmp_path / "delta", mode="delta")
    loaded = mp.load_adapter(mlp(), tmp_path / "delta")  # a merged-weights directory, copied into a fresh base
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, mean[key], rtol=1e-6, atol=1e-6)
    if isinstance(config, mp.MTLoRAConfig):  # B T A is not linear in the factors: the two modes differ
        write_merged(model, states, weights, tmp_path / "factors", mode="factors")
        factors = mp.load_adapter(mlp(), tmp_path / "factors").merge_and_unload().state_dict()
        assert not torch.allclose(factors["0.weight"], mean["0.weight"])


def test_mismatched_methods_and_shapes_are_refused_naming_the_key(tmp_path) -> None:
    a, (sa, *_) = saves(mp.MTLoRAConfig(rank=2), n=1)
    b, (sb, *_) = saves(mp.MTLoRAConfig(rank=3), n=1)
    with pytest.raises(ValueError, match=r"'0.adapters.A' has shape \(3, 8\) in checkpoint 1 but \(2, 8\)"):
        average_states([sa, sb], [0.5, 0.5])
    c, (sc, *_) = saves(mp.SVFitConfig(rank=2), n=1)
    with pytest.raises(ValueError, match="hold different tensors"):
        average_states([sa, sc], [0.5, 0.5])
    a.save_adapter(tmp_path / "a")
    c.save_adapter(tmp_path / "c")
    with pytest.raises(ValueError, match=r"'method' is 'svfit' in .* but 'mtlora' in"):
        merge_adapter_dirs(mlp(), [tmp_path / "a", tmp_path / "c"], [1.0, 1.0], tmp_path / "out")
    b.save_adapter(tmp_path / "b")
    with pytest.raises(ValueError, match=r"'rank' is 3 in .* but 2 in"):
        merge_adapter_dirs(mlp(), [tmp_path / "a", tmp_path / "b"], [1.0, 1.0], tmp_path / "out")
    model, states = saves(mp.BottleneckConfig(bottleneck_dim=2, target_modules=["0"]), n=2)
    from modalpeft.lightning.mwa import write_merged

    with pytest.raises(ValueError, match="cannot be merged"):
        write_merged(model, states, [0.5, 0.5], tmp_path / "adapter", mode="delta")


@pytest.mark.parametrize("mode", ["factors", "delta"])
def test_callback_writes_the_merge_of_the_last_saves(mode, tmp_path) -> None:
    pl.seed_everything(0)
    trained = task(mp.SVFitConfig(rank=4, target_modules=["qkv"]))
    mwa = MetricWeightedAveraging(tmp_path / "mwa", keep=2, every_n_train_steps=2, mode=mode, penalty=1.0)
    trainer(tmp_path, max_steps=7, callbacks=[mwa]).fit(trained, datamodule=data())
    info = json.loads((tmp_path / "mwa" / "mwa.json").read_text())
    assert info["steps"] == [4, 6] and info["monitor"] == "train/loss"
    assert info["weights"] == pytest.approx(mwa_weights(info["metrics"], 1.0))
    loaded = mp.load_adapter(backbone(), tmp_path / "mwa")
    x = torch.randn(2, 1, 8, 8)
    assert loaded.eval()(x).shape == (2, 10)
    if mode == "factors":  # SVFit is linear in its vector: the factors' average is the merged models' average
        states = [s for _, _, s in mwa.saves]
        expected = average_states(states, info["weights"])
        for key, value in loaded.adapter_state_dict().items():
            torch.testing.assert_close(value, expected[key])


def test_callback_refuses_an_unlogged_metric_and_a_baseline(tmp_path) -> None:
    with pytest.raises(ValueError, match="'val/nope', which was not logged"):
        mwa = MetricWeightedAveraging(tmp_path / "m", monitor="val/nope")
        trainer(tmp_path, max_epochs=1, callbacks=[mwa]).fit(task(), datamodule=data())
    with pytest.raises(ValueError, match="trains no adapter"):
        trainer(tmp_path, max_epochs=1, callbacks=[MetricWeightedAveraging(tmp_path / "m")]).fit(
            task("linear"), datamodule=data()
        )
    mwa = MetricWeightedAveraging(tmp_path / "m", mode="delta")
    with pytest.raises(ValueError, match="cannot be merged"):  # before training, not after
        trainer(tmp_path, max_epochs=1, callbacks=[mwa]).fit(task(mp.BottleneckConfig()), datamodule=data())
    assert not mwa.saves
    with pytest.raises(ValueError, match="keep=0"):
        MetricWeightedAveraging(keep=0)


def test_evaluate_merges_scores_each_variant_and_leaves_the_model_as_trained() -> None:
    from modalpeft.lightning.mwa import evaluate_merges, variant_weights

    model, states = saves(mp.create_config("krona", a1=2, a2=2))
    trained = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    runs = [(10, 2.0, states[0]), (20, 1.0, states[1]), (30, 0.5, states[2])]
    weights = variant_weights(runs, (1.0, 10.0))
    assert list(weights) == ["uniform", "loss p=1", "loss p=10", "step p=1"]
    assert weights["uniform"] == pytest.approx([1 / 3] * 3)
    assert weights["loss p=1"] == pytest.approx([0.5 / 3.5, 1 / 3.5, 2 / 3.5])  # ∝ 1/loss
    assert weights["step p=1"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])  # ∝ step
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))

    def score(m: nn.Module) -> float:
        with torch.no_grad():
            return float(m(x).sum())

    out = evaluate_merges(model, runs, score, (1.0, 10.0))
    assert list(out) == ["last", *weights]
    for name, w in weights.items():
        expected = copy.deepcopy(model)
        expected.load_adapter_state(average_states(states, w), expected.active_adapter)
        assert out[name] == pytest.approx(score(expected), rel=1e-6)
    assert out["last"] == pytest.approx(score(model))
    assert all(torch.equal(v, trained[k]) for k, v in model.adapter_state_dict().items())
