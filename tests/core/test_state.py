"""Adapter files: atomic writes, validation on load, corrupted files, never unpickling."""

from __future__ import annotations

import json
import pickle

import peft
import pytest
import torch

import modalpeft as mp
from modalpeft.core import state as state_mod

from .toy_models import make


def saved(tmp_path, **kwargs):
    model = mp.adapt(make("mlp"), mp.BitFitConfig(init_weights=False, **kwargs), modules_to_save=["head"])
    model.save_adapter(tmp_path)
    return model


def test_files_and_keys(tmp_path) -> None:
    saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "bitfit" and config["modalpeft_version"] == mp.__version__
    assert config["base_model_class"].endswith("toy_models.MLP") and config["modules_to_save"] == ["head"]
    keys = set(state_mod.read_tensors(tmp_path))
    assert keys == {
        "fc1.adapters.bias_delta",
        "norm.adapters.bias_delta",
        "fc2.adapters.bias_delta",
        "head.weight",
        "head.bias",
    }


def test_failed_write_leaves_old_files_and_no_temporaries(tmp_path, monkeypatch) -> None:
    saved(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(state_mod, "save_file", broken)
    model = mp.adapt(make("mlp", seed=1), mp.BitFitConfig(init_weights=False))
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_adapter_for_another_architecture_names_keys_and_leaves_model(tmp_path) -> None:
    saved(tmp_path)
    other = make("conv")
    before = [type(m) for m in other.modules()]
    with pytest.raises(ValueError) as err:
        mp.load_adapter(other, tmp_path)
    message = str(err.value)
    assert "missing keys" in message and "unexpected keys" in message
    assert "fc1.adapters.bias_delta" in message and "conv1.adapters.bias_delta" in message
    assert [type(m) for m in other.modules()] == before


def test_shape_mismatch_is_reported(tmp_path) -> None:
    saved(tmp_path, target_modules=["fc2"])
    other = make("mlp")
    other.head = torch.nn.Linear(32, 7)
    with pytest.raises(ValueError, match=r"head.weight: saved \(4, 32\) vs model \(7, 32\)"):
        mp.load_adapter(other, tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path) -> None:
    saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        mp.load_adapter(make("mlp"), tmp_path)


def test_pickle_is_never_loaded(tmp_path) -> None:
    saved(tmp_path)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (tmp_path / "adapter_model.safetensors").write_bytes(pickle.dumps({"fc1": Boom()}))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        mp.load_adapter(make("mlp"), tmp_path)


def test_missing_directory_and_bad_json(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        mp.load_adapter(make("mlp"), tmp_path / "nope")
    saved(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        mp.load_adapter(make("mlp"), tmp_path)


def test_unknown_config_field_is_named(tmp_path) -> None:
    saved(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["rank_of_the_future"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rank_of_the_future"):
        mp.load_adapter(make("mlp"), tmp_path)


def test_load_into_an_adapted_model_adds_an_adapter(tmp_path) -> None:
    model = saved(tmp_path)
    x = torch.randn(3, 16)
    expected = model(x)
    other = mp.adapt(make("mlp"), mp.BitFitConfig(target_modules=["fc1"]))
    other = mp.load_adapter(other, tmp_path, adapter_name="loaded")
    assert other.adapter_names == ["default", "loaded"] and other.active_adapter == "loaded"
    torch.testing.assert_close(other(x), expected)


def _tamper(directory) -> None:
    """Give one saved tensor a wrong shape: the adapter's layers are placed, then loading its tensors fails."""
    tensors = state_mod.read_tensors(directory)
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(tensors[key].numel() + 1)
    state_mod.atomic_write({state_mod.WEIGHTS_NAME: tensors}, directory)


FAILED_LOAD_CONFIGS = {
    "native": lambda target: mp.BitFitConfig(init_weights=False, target_modules=[target]),
    "peft": lambda target: peft.LoraConfig(r=2, target_modules=[target], init_lora_weights=False),
}


@pytest.mark.parametrize("kind", sorted(FAILED_LOAD_CONFIGS))
def test_failed_load_into_an_adapted_model_leaves_it_unchanged(kind: str, tmp_path) -> None:
    config = FAILED_LOAD_CONFIGS[kind]
    mp.adapt(make("mlp", seed=1), config("fc2"), modules_to_save=["head"]).save_adapter(tmp_path)
    _tamper(tmp_path)
    model = mp.adapt(make("mlp"), config("fc1"))
    model.add_adapter("second", config("fc2"))
    model.set_adapter("second")  # not the first adapter: a clean-up must not fall back to that one
    model.requires_grad_(False)  # as loaded for inference: a clean-up must not make the active adapter trainable
    x = torch.randn(3, 16)
    expected = model(x)
    before = {
        "adapters": list(model.adapter_names),
        "active": model.active_adapter,
        "modules": [f"{n}:{type(m).__name__}" for n, m in model.named_modules()],
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
    }
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit"):
        mp.load_adapter(model, tmp_path, adapter_name="loaded")
    after = {
        "adapters": list(model.adapter_names),
        "active": model.active_adapter,
        "modules": [f"{n}:{type(m).__name__}" for n, m in model.named_modules()],
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
    }
    assert after == before
    assert model.state_dict().keys() == tensors.keys()
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
