"""peft methods through ``mp.adapt``: peft's files, in-place ``modules_to_save``, the same interface."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import modalpeft as mp

from .toy_models import make


def lora(**kwargs) -> peft.LoraConfig:
    return peft.LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False, **kwargs)


def test_saved_directory_is_peft_format_and_loads_in_peft_with_the_head(tmp_path) -> None:
    model = mp.adapt(make("mlp"), lora(), modules_to_save=["head"])
    with torch.no_grad():
        model.base_model.base_model.model.head.weight.add_(1.0)  # a "trained" head
    x = torch.randn(3, 16)
    expected = model(x)
    model.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["head"]
    in_peft = peft.PeftModel.from_pretrained(make("mlp"), tmp_path)
    torch.testing.assert_close(in_peft(x), expected)
    in_mp = mp.load_adapter(make("mlp"), tmp_path)
    torch.testing.assert_close(in_mp(x), expected)


def test_modules_to_save_have_no_frozen_duplicate() -> None:
    model = mp.adapt(make("mlp"), lora(modules_to_save=["head"]))
    names = [n for n, _ in model.named_modules()]
    assert not any("modules_to_save" in n or "original_module" in n for n in names)
    assert model.base_model.base_model.model.head.weight.requires_grad


def test_second_peft_adapter_and_switching() -> None:
    x = torch.randn(3, 16)
    model = mp.adapt(make("mlp"), lora())
    out_default = model(x)
    model.add_adapter("other", lora())
    assert model.active_adapter == "other" and sorted(model.adapter_names) == ["default", "other"]
    assert not torch.allclose(model(x), out_default)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other" in n for n in trainable)
    model.set_adapter("default")
    torch.testing.assert_close(model(x), out_default)
    model.delete_adapter("other")
    assert model.adapter_names == ["default"]


def test_native_and_peft_configs_do_not_mix() -> None:
    model = mp.adapt(make("mlp"), lora())
    with pytest.raises(TypeError, match="peft configs only"):
        model.add_adapter("b", mp.BitFitConfig())
    native = mp.adapt(make("mlp"), mp.BitFitConfig())
    with pytest.raises(TypeError, match="native configs only"):
        native.add_adapter("b", lora())


def test_peft_adapter_for_another_model_is_refused(tmp_path) -> None:
    mp.adapt(make("mlp"), lora(), modules_to_save=["head"]).save_adapter(tmp_path)
    other = make("mlp")
    other.fc1 = torch.nn.Linear(16, 64)
    other.norm = torch.nn.LayerNorm(64)
    other.fc2 = torch.nn.Linear(64, 32)
    with pytest.raises(ValueError, match="shape mismatches"):
        mp.load_adapter(other, tmp_path)
    assert type(other.fc1) is torch.nn.Linear


PEFT_FORMATS = {
    "lora-conv-batchnorm": (
        "conv",
        peft.LoraConfig(r=2, lora_alpha=3, target_modules=["conv1"], init_lora_weights=False),
    ),
    "lokr": ("mlp", peft.LoKrConfig(r=2, alpha=5, target_modules=["fc1", "fc2"], init_weights=False)),
    "ln_tuning": ("mlp", peft.LNTuningConfig(target_modules=["norm"])),
}


@pytest.mark.parametrize("name", sorted(PEFT_FORMATS))
def test_peft_loads_our_trained_adapters(name: str, tmp_path) -> None:
    """peft's own loader reads what we save (after training in train mode: LN tuning's norm and the BatchNorm
    statistics move too), with the head."""
    toy, config = PEFT_FORMATS[name]
    model = mp.adapt(make(toy), config, modules_to_save=["head"])
    x = make(toy).make_input()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    expected = model(x)
    assert not torch.allclose(expected, make(toy)(x), atol=1e-4)
    model.save_adapter(tmp_path)
    in_peft = peft.PeftModel.from_pretrained(make(toy), tmp_path).eval()
    torch.testing.assert_close(in_peft(x), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mp.load_adapter(make(toy), tmp_path)(x), expected, atol=1e-6, rtol=1e-6)
