"""LoFiT: the official per-head computation transcribed, counts, exact merge into the output projection, head
selection, the two-stage flow and the L1 term."""

from __future__ import annotations

import pytest
import torch

import modalpeft as mp
from modalpeft.core.inject import hosts
from modalpeft.text import tiny_model
from modalpeft.text.methods.lofit import lofit_modules, select_heads


def official_heads(attn_output, A, v, head_dim):
    """fc2869/lo-fit ``models/modeling_llama.py`` (LlamaAttention.forward, after the heads are concatenated)."""
    out = attn_output.clone()
    for i, (a, b) in enumerate(zip(A, v, strict=True)):
        sl = slice(i * head_dim, (i + 1) * head_dim)
        out[:, :, sl] = torch.mul(a + 1, out[:, :, sl].clone()) + b
    return out


def test_scale_stage_equals_the_official_computation_on_llama() -> None:
    model = mp.adapt(tiny_model("llama"), mp.LoFiTConfig(init_weights=False))
    host = model.base_model.layers[0].self_attn.o_proj
    module = host.adapters["default"]
    z = torch.randn(2, 5, 32)
    zeros = [torch.zeros(8)] * 4
    expected = host.base_layer(official_heads(z, list(module.A), zeros, 8))
    torch.testing.assert_close(host(z), expected)


def test_counts_for_both_stages_and_llama_7b_shapes() -> None:
    assert mp.adapt(tiny_model("bert"), mp.LoFiTConfig()).trainable_summary()["trainable"] == 2 * 4 * 8
    bias = mp.LoFiTConfig(stage="bias", heads=[[0, 1], [1, 3], [1, 0]])
    model = mp.adapt(tiny_model("bert"), bias)
    assert model.trainable_summary()["trainable"] == 3 * 8
    assert [m.bias_index.tolist() for m in lofit_modules(model)] == [[1], [0, 3]]
    from transformers import LlamaConfig, LlamaModel

    with torch.device("meta"):
        llama = LlamaModel(LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32))
    assert mp.adapt(llama, mp.LoFiTConfig()).trainable_summary()["trainable"] == 131_072  # spec §3f
    heads = [[i % 32, i // 32] for i in range(32)]
    with torch.device("meta"):
        llama = LlamaModel(LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32))
    assert mp.adapt(llama, mp.LoFiTConfig(stage="bias", heads=heads)).trainable_summary()["trainable"] == 4_096


def test_merge_into_the_output_projection_is_exact() -> None:
    heads = [[0, 0], [0, 2], [1, 1]]
    for config in (mp.LoFiTConfig(init_weights=False), mp.LoFiTConfig(stage="bias", heads=heads, init_weights=False)):
        model = mp.adapt(tiny_model("bert"), config)
        ids = torch.randint(2, 100, (2, 6))
        expected = model(input_ids=ids).last_hidden_state
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_offsets_cannot_merge_into_a_projection_without_bias() -> None:
    model = mp.adapt(tiny_model("llama"), mp.LoFiTConfig(stage="bias", heads=[[0, 0]], init_weights=False))
    with pytest.raises(ValueError, match="need a bias in the output projection"):
        model.merge_adapter()


def test_selection_then_bias_stage() -> None:
    model = mp.adapt(tiny_model("bert"), mp.LoFiTConfig(init_weights="identity"))
    with torch.no_grad():
        lofit_modules(model)[1].A[2] = 1.0  # layer 1, head 2: the largest
        lofit_modules(model)[0].A[3] = 0.5
    assert select_heads(model, 2) == [[1, 2], [0, 3]]
    assert len(select_heads(model)) == 0  # 10% of 8 heads rounds down, as the official int(0.1 * H * L)
    ids = torch.randint(2, 100, (2, 6))
    penalty = mp.LoFiTConfig(l1_weight=0.1).training_penalty(model)
    torch.testing.assert_close(penalty, torch.tensor(0.1 * (8 * 1.0 + 8 * 0.5)))
    stage2 = mp.adapt(tiny_model("bert"), mp.LoFiTConfig(stage="bias", heads=select_heads(model, 2)))
    assert [n for n, _ in hosts(stage2.base_model)] == [
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.1.attention.output.dense",
    ]
    assert stage2(input_ids=ids).last_hidden_state.shape == (2, 6, 32)
    with pytest.raises(ValueError, match="needs a model adapted with LoFiTConfig"):
        select_heads(stage2, 1)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="stage='bias' needs heads"):
        mp.LoFiTConfig(stage="bias")
    with pytest.raises(ValueError, match=r"head \[5, 0\] is outside the model's 2 layers x 4 heads"):
        mp.adapt(tiny_model("bert"), mp.LoFiTConfig(stage="bias", heads=[[5, 0]]))
