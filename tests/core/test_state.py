"""Adapter files: atomic writes, validation on load, corrupted files, never unpickling."""

from __future__ import annotations

import json
import os
import pickle
import stat

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


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_umask_permissions(tmp_path, umask) -> None:
    """Not the owner-only 0600 of the temporary file: what ``open`` would give under the process's umask."""
    old = os.umask(umask)
    try:
        saved(tmp_path / "adapter")
        state_mod.atomic_write({"report.md": b"x", "results.json": {"a": 1}}, tmp_path / "other")
    finally:
        os.umask(old)
    files = [*(tmp_path / "adapter").iterdir(), *(tmp_path / "other").iterdir()]
    assert len(files) == 4
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_saving_to_an_existing_file_names_the_path(tmp_path) -> None:
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(b"something")
    model = mp.adapt(make("mlp"), mp.BitFitConfig())
    with pytest.raises(ValueError, match=r"adapter\.safetensors.*is an existing file; give a folder path"):
        model.save_adapter(target)
    with pytest.raises(ValueError, match="is an existing file"):
        model.save_adapter(target / "inside")
    assert target.read_bytes() == b"something"


def test_a_missing_config_field_is_named_and_blamed_first_when_the_weights_do_not_fit(tmp_path) -> None:
    mp.adapt(make("mlp"), mp.BitFitConfig(target_modules=["fc1"])).save_adapter(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["target_modules"]
    path.write_text(json.dumps(config))
    warned = pytest.warns(UserWarning, match=r"has no \['target_modules'\]: they take their defaults")
    with (
        warned,
        pytest.raises(ValueError, match=r"lacks \['target_modules'\], so they took their defaults; most likely"),
    ):
        mp.load_adapter(make("mlp"), tmp_path)
    config["target_modules"] = ["fc1"]
    del config["exclude_modules"]  # a default that fits: a warning only
    path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"has no \['exclude_modules'\]"):
        mp.load_adapter(make("mlp"), tmp_path)


def test_a_baseline_saves_what_it_trained_and_loads_through_load_adapter(tmp_path) -> None:
    """Linear probing and full fine-tuning write the same files as an adapter, which load_adapter reads."""
    trained = make("mlp", seed=1)
    for name, p in trained.named_parameters():
        p.requires_grad_(name.startswith("head."))
    mp.save_baseline(trained, tmp_path / "linear", "linear")
    assert json.loads((tmp_path / "linear" / "adapter_config.json").read_text())["baseline"] == "linear"
    assert set(state_mod.read_tensors(tmp_path / "linear")) == {"head.weight", "head.bias"}
    fresh = make("mlp", seed=2)
    loaded = mp.load_adapter(fresh, tmp_path / "linear")
    assert loaded is fresh and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.head.weight, trained.head.weight, rtol=0, atol=0)
    other = make("conv")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this ConvNet"):
        mp.load_adapter(other, tmp_path / "linear")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="baseline='probe' is not valid"):
        mp.save_baseline(trained, tmp_path / "x", "probe")
