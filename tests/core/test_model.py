"""The lifecycle on ``AdaptedModel``: several adapters, pass-through, failures that leave the model as it was."""

from __future__ import annotations

import pytest
import torch

import modalpeft as mp
from modalpeft.core.inject import hosts

from .toy_models import make


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_attributes_and_forward_pass_through() -> None:
    model = mp.adapt(make("vit"), mp.BitFitConfig())
    assert model.num_features == 32 and model.num_prefix_tokens == 1
    x = torch.randn(2, 3, 16, 16)
    assert model.forward_features(x).shape == (2, 5, 32)
    assert model(x).shape == (2, 4)


def test_several_adapters_switch_and_delete() -> None:
    reference = make("mlp")
    x = reference.make_input()
    model = mp.adapt(make("mlp"), mp.BitFitConfig(init_weights=False), adapter_name="a")
    out_a = model(x)
    model.add_adapter("b", mp.BitFitConfig(init_weights=False, target_modules=["fc1"]))
    assert model.active_adapter == "b" and model.adapter_names == ["a", "b"]
    out_b = model(x)
    assert not torch.allclose(out_a, out_b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.fc1.adapters.b.bias_delta"}
    model.set_adapter("a")
    torch.testing.assert_close(model(x), out_a)
    model.delete_adapter("a")
    assert model.active_adapter == "b" and model.adapter_names == ["b"]
    torch.testing.assert_close(model(x), out_b)
    assert [n for n, _ in hosts(model.base_model)] == ["fc1"]
    model.delete_adapter("b")
    torch.testing.assert_close(model(x), reference(x))
    assert not list(hosts(model))


def test_taken_adapter_name_is_refused_and_changes_nothing() -> None:
    model = mp.adapt(make("mlp"), mp.BitFitConfig())
    before = state(model)
    with pytest.raises(ValueError, match="'default' exists already"):
        model.add_adapter("default", mp.BitFitConfig(target_modules=["fc1"]))
    assert state(model).keys() == before.keys()


def test_target_that_matches_nothing_lists_existing_modules() -> None:
    base = make("mlp")
    before = state(base)
    with pytest.raises(ValueError, match=r"matched no module.*'fc1'"):
        mp.adapt(base, mp.BitFitConfig(target_modules=["does_not_exist"]))
    assert state(base).keys() == before.keys()


def test_unknown_modules_to_save_is_an_error() -> None:
    with pytest.raises(ValueError, match="no module named 'classifier'"):
        mp.adapt(make("mlp"), mp.BitFitConfig(), modules_to_save=["classifier"])


def test_adapting_twice_points_to_add_adapter() -> None:
    model = mp.adapt(make("mlp"), mp.BitFitConfig())
    with pytest.raises(TypeError, match="add_adapter"):
        mp.adapt(model, mp.BitFitConfig())


def test_non_config_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="create_config"):
        mp.adapt(make("mlp"), {"method": "bitfit"})


def test_failure_inside_apply_leaves_model_unchanged(monkeypatch) -> None:
    from modalpeft.core import registry

    info = registry.get_method("bitfit")

    def half_then_fail(model, config, adapter_name, state=None):
        info.apply(model, config, adapter_name, state)
        raise RuntimeError("boom")

    monkeypatch.setitem(registry._REGISTRY, "bitfit", info.__class__(**{**info.__dict__, "apply": half_then_fail}))
    base = make("mlp")
    types = [type(m) for m in base.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        mp.adapt(base, mp.BitFitConfig())
    assert [type(m) for m in base.modules()] == types


def test_print_trainable_parameters(capsys) -> None:
    model = mp.adapt(make("mlp"), mp.BitFitConfig(), modules_to_save=["head"])
    model.print_trainable_parameters()
    summary = model.trainable_summary()
    assert summary["trainable"] == 32 + 32 + 32 + 4 * 32 + 4
    assert f"trainable: {summary['trainable']:,}" in capsys.readouterr().out


def test_modules_to_save_train_in_place_without_a_copy() -> None:
    base = make("mlp")
    head_weight = base.head.weight
    model = mp.adapt(base, mp.BitFitConfig(), modules_to_save=["head"])
    assert model.base_model.head.weight is head_weight and head_weight.requires_grad
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in make("mlp").parameters()) + 32 * 3  # only the bias deltas


def test_disable_adapters_unmerges_and_restores_merge() -> None:
    reference = make("mlp")
    x = reference.make_input()
    model = mp.adapt(make("mlp"), mp.BitFitConfig(init_weights=False))
    adapted = model(x)
    model.merge_adapter()
    with model.disable_adapters():
        torch.testing.assert_close(model(x), reference(x))
    torch.testing.assert_close(model(x), adapted)
    assert all(h.merged == ["default"] for _, h in hosts(model))


def test_frozen_eval_keeps_the_base_in_eval_mode(monkeypatch) -> None:
    model = mp.adapt(make("vit"), mp.BitFitConfig(), modules_to_save=["head"])
    model.train()
    assert model.base_model.blocks[0].attn.training  # by default everything trains
    monkeypatch.setattr(model.peft_config["default"], "frozen_eval", True, raising=False)
    model.train()
    assert not model.base_model.blocks[0].attn.training and not model.base_model.blocks[0].attn.proj.training
    assert model.base_model.head.training
    assert all(host.adapters.training for _, host in hosts(model.base_model))
    model.eval()
    assert not any(m.training for m in model.modules())


def test_fields_marked_not_saved_stay_out_of_json() -> None:
    import dataclasses

    @dataclasses.dataclass
    class WithData(mp.BitFitConfig):
        data: object = dataclasses.field(default=None, metadata={"help": "run-time input", "save": False})

    assert "data" not in WithData(data=[1, 2]).to_dict()


def test_new_adapters_follow_the_mode_of_the_model() -> None:
    model = mp.adapt(make("mlp").eval(), mp.create_config("krona", a1=4, a2=4, dropout=0.5, init_weights=False))
    assert not model.training and not any(m.training for m in model.modules())
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), model(x))  # no dropout in eval mode
    model.train()
    assert all(m.training for m in model.modules())


def test_running_statistics_updated_in_training_are_saved_and_loaded(tmp_path) -> None:
    """A frozen BatchNorm still updates its running statistics in training mode; the saved adapter carries them,
    so the reloaded model is the trained one (the point-cloud encoders' BatchNorm trains this way)."""

    def convnet() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv1d(3, 8, 1),
            torch.nn.BatchNorm1d(8),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(32, 2),
        )

    x = torch.randn(5, 3, 4) * 3 + 1
    model = mp.adapt(convnet(), mp.BitFitConfig(target_modules=["0"]), modules_to_save=["4"])
    model.train()
    model(x).sum().backward()
    model.eval()
    bn = model.base_model[1]
    assert not bn.weight.requires_grad and int(bn.num_batches_tracked) == 1
    state = model.adapter_state_dict()
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(state)
    model.save_adapter(tmp_path / "a")
    loaded = mp.load_adapter(convnet(), tmp_path / "a").eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not torch.equal(convnet().eval()(x), model(x))


def test_a_method_that_places_no_trainable_parameter_says_so(monkeypatch) -> None:
    """Adapting nothing but modules_to_save is linear probing: never in silence."""
    import dataclasses

    from modalpeft.core import registry

    info = registry.get_method("bitfit")
    monkeypatch.setitem(registry._REGISTRY, "bitfit", dataclasses.replace(info, apply=lambda *args: None))
    with pytest.warns(UserWarning, match=r"bitfit: adapter 'default' placed no trainable parameter.*\['head'\]"):
        mp.adapt(make("mlp"), mp.BitFitConfig(), modules_to_save=["head"])
