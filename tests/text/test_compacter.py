"""Compacter / Compacter++ / PHM-Adapter: the spec's counts on t5-base, the shared rule, the official
computation transcribed."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5Model

import modalpeft as mp
from modalpeft.core.inject import hosts
from modalpeft.text import tiny_model


def t5_base_on_meta() -> torch.nn.Module:
    config = T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, vocab_size=32128)
    with torch.device("meta"):
        return T5Model(config)


@pytest.mark.parametrize(("variant", "count"), [("compacter", 161_728), ("compacter++", 104_704)])
def test_t5_base_counts_match_the_spec(variant, count) -> None:
    """Spec §9f: 48 adapters x 2,376 + 64 = 114,112 (24 x 2,376 + 64 = 57,088) plus 62 x 768 LayerNorm weights."""
    model = mp.adapt(t5_base_on_meta(), mp.CompacterConfig(variant=variant))
    assert model.trainable_summary()["trainable"] == count


def test_cross_attention_is_not_adapted() -> None:
    model = mp.adapt(tiny_model("t5"), mp.CompacterConfig(reduction_factor=4, train_layer_norms=False))
    names = [n for n, _ in hosts(model.base_model)]
    assert "decoder.block.0.layer.0.SelfAttention.o" in names and "decoder.block.0.layer.2.DenseReluDense.wo" in names
    assert not any("EncDecAttention" in n for n in names) and len(names) == 8


def test_one_rule_is_shared_trained_and_saved_once(tmp_path) -> None:
    model = mp.adapt(tiny_model("t5"), mp.CompacterConfig(reduction_factor=4, init_weights=False))
    adapters = [h.adapters["default"] for _, h in hosts(model.base_model) if hasattr(h.adapters["default"], "up")]
    rules = {id(a.down.rule) for a in adapters} | {id(a.up.rule) for a in adapters}
    assert len(rules) == 1
    keys = [k for k in model.adapter_state_dict() if "phm_rule" in k]
    assert keys == ["encoder.block.0.layer.0.SelfAttention.o.adapters.down.phm_rule"]
    ids = torch.randint(2, 100, (2, 6))
    model(input_ids=ids, decoder_input_ids=ids).last_hidden_state.pow(2).mean().backward()
    assert adapters[0].down.rule.grad is not None and adapters[-1].up.rule.requires_grad
    model.save_adapter(tmp_path)
    with torch.no_grad():
        adapters[0].down.rule.mul_(3.0)  # the reloaded model must see the saved rule everywhere
    expected = model(input_ids=ids, decoder_input_ids=ids).last_hidden_state
    fresh = mp.load_adapter(tiny_model("t5"), tmp_path)
    with torch.no_grad():
        fresh_adapters = [
            h.adapters["default"] for _, h in hosts(fresh.base_model) if hasattr(h.adapters["default"], "up")
        ]
        fresh_adapters[0].down.rule.mul_(3.0)
    torch.testing.assert_close(fresh(input_ids=ids, decoder_input_ids=ids).last_hidden_state, expected)


def official_t5_layer_self_attention(layer, adapter, h: torch.Tensor) -> torch.Tensor:
    """compacter ``T5LayerSelfAttention`` (eval): y = SelfAttn(LN(h)); y = adapter(y) + y; h + y, with
    ``HyperComplexAdapter``: up(gelu_new(down(y))) and ``PHMLinear.forward``'s
    ``matvec_product(W = bmm(W_left, W_right), x, b, phm_rule)`` using ``kronecker_product_einsum_batched``."""

    def phm(x, lin):
        w = torch.bmm(lin.W_left, lin.W_right)
        rule = lin.rule
        big = torch.einsum("bac,bkp->bakcp", rule, w).reshape(rule.size(0), rule.size(1) * w.size(1), -1).sum(0)
        return torch.matmul(x, big) + lin.bias

    y = layer.SelfAttention.base_layer if hasattr(layer.SelfAttention, "base_layer") else layer.SelfAttention
    normed = layer.layer_norm(h)
    attn = y(normed)[0]
    attn = attn + phm(torch.nn.functional.gelu(phm(attn, adapter.down), approximate="tanh"), adapter.up)
    return h + attn


def test_compacter_block_equals_the_official_computation() -> None:
    model = mp.adapt(tiny_model("t5"), mp.CompacterConfig(reduction_factor=4, init_weights=False))
    layer = model.base_model.encoder.block[0].layer[0]
    adapter = layer.SelfAttention.o.adapters["default"]
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        # the o projection wrapped by the adapter host vs the transcription's explicit adapter call
        plain = layer.SelfAttention.o.base_layer
        layer.SelfAttention.o.disabled = True
        expected = official_t5_layer_self_attention(layer, adapter, h)
        layer.SelfAttention.o.disabled = False
        assert plain is layer.SelfAttention.o.base_layer
        torch.testing.assert_close(layer(h)[0], expected, atol=1e-6, rtol=1e-5)


def test_identity_init_and_paper_init() -> None:
    ids = torch.randint(2, 100, (2, 6))
    ref = tiny_model("t5")(input_ids=ids, decoder_input_ids=ids).last_hidden_state
    ident = mp.adapt(tiny_model("t5"), mp.CompacterConfig(reduction_factor=4, init_weights="identity"))
    torch.testing.assert_close(ident(input_ids=ids, decoder_input_ids=ids).last_hidden_state, ref, atol=1e-5, rtol=0)
    paper = mp.adapt(tiny_model("t5"), mp.CompacterConfig(reduction_factor=4))
    first = next(h for _, h in hosts(paper.base_model) if hasattr(h.adapters["default"], "up")).adapters["default"]
    assert first.up.W_right.abs().sum() > 0 and first.down.rule.std() < 1e-3  # not exactly the identity (spec §9c)


def test_bad_phm_sizes_are_named() -> None:
    with pytest.raises(ValueError, match=r"phm_n=3 must divide the width d=32 and the bottleneck r=8"):
        mp.adapt(tiny_model("t5"), mp.CompacterConfig(reduction_factor=4, phm_n=3))
    with pytest.raises(ValueError, match=r"variant='compacter\+' is not valid"):
        mp.CompacterConfig(variant="compacter+")
    with pytest.raises(ValueError, match="reduction_factor=0"):
        mp.CompacterConfig(reduction_factor=0)
