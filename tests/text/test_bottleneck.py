"""Houlsby, Pfeiffer and (scaled) parallel adapters on transformers models: placement, counts, the official
computations transcribed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import RobertaConfig, RobertaModel

import modalpeft as mp
from modalpeft.core.inject import hosts
from modalpeft.text import tiny_model

from ..core.toy_models import MLP


def roberta_base_on_meta() -> nn.Module:
    """RoBERTa-base with its real sizes (125M parameters) on the meta device: shapes only, no download."""
    with torch.device("meta"):
        return RobertaModel(RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1))


def test_parallel_adapter_on_roberta_base_has_the_spec_count() -> None:
    """Spec §9f: 12·(2·768·16 + 16 + 768) = 304,320."""
    model = mp.adapt(roberta_base_on_meta(), mp.ParallelAdapterConfig(bottleneck_dim=16, scaling=2.0))
    assert model.trainable_summary()["trainable"] == 304_320


def test_houlsby_on_roberta_base_counts_adapters_and_layer_norms() -> None:
    """24 adapters of 2·768·64 + 64 + 768 plus 25 LayerNorms (embeddings + 2 per layer) of 2·768."""
    model = mp.adapt(roberta_base_on_meta(), mp.HoulsbyConfig())
    assert model.trainable_summary()["trainable"] == 24 * (2 * 768 * 64 + 64 + 768) + 25 * 2 * 768


@pytest.mark.parametrize(
    ("method", "hosts_of_block0"),
    [
        ("houlsby", ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"]),
        ("pfeiffer", ["encoder.layer.0.output.dense"]),
        ("parallel_adapter", ["encoder.layer.0.output"]),
    ],
)
def test_placement_in_a_post_ln_encoder(method, hosts_of_block0) -> None:
    model = mp.adapt(tiny_model("bert"), mp.create_config(method, bottleneck_dim=4, train_layer_norms=False))
    names = [n for n, _ in hosts(model.base_model) if n.startswith("encoder.layer.0.")]
    assert names == hosts_of_block0


def test_parallel_adapter_in_bert_is_he_et_al_roberta_output() -> None:
    """unify-parameter-efficient-tuning ``RobertaOutput``: h = dropout(dense(inter)) + a(x); LN(h + x), with
    a(x) = s·up(relu(down(x))) and x the attention output (transcribed, eval mode)."""
    model = mp.adapt(tiny_model("bert"), mp.ParallelAdapterConfig(bottleneck_dim=4, scaling=2.0, init_weights=False))
    host = model.base_model.encoder.layer[0].output
    adapter = host.adapters["default"]
    inter, x = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    out = host.base_layer
    a = 2.0 * adapter.up(torch.relu(adapter.down(x)))
    expected = out.LayerNorm(out.dense(inter) + a + x)
    torch.testing.assert_close(host(inter, x), expected)


def test_series_adapter_in_llama_follows_the_attention_output() -> None:
    """Houlsby in a pre-LN decoder: o_proj(h) + a(o_proj(h)) feeds the residual add."""
    model = mp.adapt(tiny_model("llama"), mp.HoulsbyConfig(bottleneck_dim=4, init_weights=False))
    host = model.base_model.layers[1].self_attn.o_proj
    adapter = host.adapters["default"]
    h = torch.randn(3, 32)
    z = host.base_layer(h)
    torch.testing.assert_close(host(h), z + adapter.up(torch.relu(adapter.down(z))))
    assert [n for n, _ in hosts(model.base_model) if "norm" in n] == [
        "layers.0.input_layernorm",
        "layers.0.post_attention_layernorm",
        "layers.1.input_layernorm",
        "layers.1.post_attention_layernorm",
        "norm",
    ]


def test_identity_at_init_and_training_changes_outputs_in_t5() -> None:
    base = tiny_model("t5")
    ids = torch.randint(2, 100, (2, 6))
    ref = base(input_ids=ids, decoder_input_ids=ids).last_hidden_state
    model = mp.adapt(tiny_model("t5"), mp.PfeifferConfig(bottleneck_dim=4))
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).last_hidden_state, ref, atol=1e-5, rtol=0)


def test_target_modules_select_blocks() -> None:
    model = mp.adapt(tiny_model("bert"), mp.PfeifferConfig(bottleneck_dim=4, target_modules=["encoder.layer.1"]))
    assert [n for n, _ in hosts(model.base_model)] == ["encoder.layer.1.output.dense"]
    with pytest.raises(ValueError, match="matched no module"):
        mp.adapt(tiny_model("bert"), mp.PfeifferConfig(target_modules=["decoder.block.0"]))


def test_unknown_architecture_and_bad_values() -> None:
    with pytest.raises(ValueError, match="houlsby: found no transformer blocks in MLP.*self_attn.o_proj"):
        mp.adapt(MLP(), mp.HoulsbyConfig())
    with pytest.raises(ValueError, match="bottleneck_dim=0"):
        mp.PfeifferConfig(bottleneck_dim=0)
    with pytest.raises(ValueError, match="scaling='big'"):
        mp.ParallelAdapterConfig(scaling="big")
    with pytest.raises(ValueError, match="act='sigmoid'"):
        mp.HoulsbyConfig(act="sigmoid")


def test_config_round_trips_through_json(tmp_path) -> None:
    model = mp.adapt(tiny_model("bert"), mp.ParallelAdapterConfig(bottleneck_dim=4, scaling=4.0, init_weights=False))
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(tiny_model("bert"), tmp_path)
    ids = torch.randint(2, 100, (2, 5))
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
