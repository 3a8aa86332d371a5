"""LLM-Adapters' series / parallel placements: the spec's LLaMA-7B counts and the official forward transcribed."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

import modalpeft as mp
from modalpeft.text import tiny_model


def llama_7b_on_meta() -> torch.nn.Module:
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    with torch.device("meta"):
        return LlamaModel(config)


@pytest.mark.parametrize(("adapter_type", "count"), [("parallel", 247_463_936), ("series", 134_217_728)])
def test_llama_7b_counts_match_the_spec(adapter_type, count) -> None:
    model = mp.adapt(llama_7b_on_meta(), mp.LLMAdaptersConfig(adapter_type=adapter_type))
    assert model.trainable_summary()["trainable"] == count


def official_forward(linear, adapter, x: torch.Tensor, adapter_type: str) -> torch.Tensor:
    """LLM-Adapters ``bottleneck.py::Linear.forward`` (transcribed; adapter_dropout 0)."""
    act = torch.tanh
    if adapter_type == "mh_adapter":
        output = adapter.up(act(adapter.down(x))) * adapter.scaling
        return torch.nn.functional.linear(output + x, linear.weight, linear.bias)
    if adapter_type == "output_adapter":
        z = torch.nn.functional.linear(x, linear.weight, linear.bias)
        return adapter.up(act(adapter.down(z))) * adapter.scaling + z
    result = torch.nn.functional.linear(x, linear.weight, linear.bias)
    return result + adapter.up(act(adapter.down(x))) * adapter.scaling


@pytest.mark.parametrize(
    ("adapter_type", "module", "official"),
    [
        ("series", "gate_proj", "mh_adapter"),
        ("series", "up_proj", "mh_adapter"),
        ("series", "down_proj", "output_adapter"),
        ("parallel", "up_proj", "parallel_adapter"),
        ("parallel", "down_proj", "parallel_adapter"),
    ],
)
def test_each_placement_equals_the_official_forward(adapter_type, module, official) -> None:
    cfg = mp.LLMAdaptersConfig(
        adapter_type=adapter_type, bottleneck_dim=8, target_modules=["gate_proj", "up_proj", "down_proj"]
    )
    model = mp.adapt(tiny_model("llama"), cfg)
    host = getattr(model.base_model.layers[0].mlp, module)
    adapter = host.adapters["default"]
    assert (
        adapter.down.bias is None and abs(float(adapter.up.weight.detach().std()) - 0.02) < 0.01
    )  # no bias, "bert" init
    x = torch.randn(2, 3, host.base_layer.in_features)
    torch.testing.assert_close(host(x), official_forward(host.base_layer, adapter, x, official))


def test_default_targets_and_errors() -> None:
    model = mp.adapt(tiny_model("llama"), mp.LLMAdaptersConfig(bottleneck_dim=4))
    assert model.trainable_summary()["trainable"] == 2 * 2 * (2 * 32 * 4)  # up + gate, 2 layers, d->r->d
    with pytest.raises(ValueError, match="matched no module of type Linear"):
        mp.adapt(tiny_model("bert"), mp.LLMAdaptersConfig())
    with pytest.raises(ValueError, match="adapter_type='both'"):
        mp.LLMAdaptersConfig(adapter_type="both")
