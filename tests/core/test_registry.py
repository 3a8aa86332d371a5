from __future__ import annotations

import dataclasses
import json

import peft
import pytest

import modalpeft as mp


def test_unknown_method_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'sft'.*'bitfit'"):
        mp.create_config("sft")


def test_peft_methods_are_found_by_name() -> None:
    assert isinstance(mp.create_config("lora", r=4), peft.LoraConfig)
    assert mp.get_config_cls("ln_tuning") is peft.LNTuningConfig


@pytest.mark.parametrize("name", mp.list_methods())
def test_configs_round_trip_through_json_and_document_every_field(name: str) -> None:
    cls = mp.get_config_cls(name)
    assert cls.method == name
    config = cls()
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == name
    assert cls.from_dict(data) == config
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_every_method_says_its_modality_mergeability_and_paper() -> None:
    for name in mp.list_methods():
        info = mp.get_method(name)
        assert info.paper.startswith("https://") and isinstance(info.mergeable, bool) and info.modality


def test_invalid_init_weights_is_refused() -> None:
    with pytest.raises(ValueError, match="init_weights='yes'"):
        mp.BitFitConfig(init_weights="yes")


def test_callable_targets_cannot_be_saved() -> None:
    config = mp.BitFitConfig(target_modules=lambda name, module: name == "fc1")
    with pytest.raises(ValueError, match="cannot be saved to JSON"):
        config.to_dict()


def test_create_config_with_an_unknown_field_lists_the_valid_ones() -> None:
    with pytest.raises(
        TypeError, match=r"BitFitConfig \(method 'bitfit'\) has no field\(s\) \['rank'\]; valid fields: "
    ):
        mp.create_config("bitfit", rank=4)
    with pytest.raises(TypeError, match=r"has no field\(s\) \['rnk'\]; valid fields: .*'r'"):
        mp.create_config("lora", rnk=4)
