"""Blocks, sublayers and norms of transformers models found by structure, not by class name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import T5Config, T5Model

import modalpeft as mp
from modalpeft.text import find_blocks, find_norms, tiny_model
from modalpeft.text.structure import is_norm

from ..core.toy_models import MLP


@pytest.mark.parametrize(
    ("arch", "layout", "blocks", "attention_output", "ffn", "arg"),
    [
        ("bert", "post_ln_encoder", 2, "encoder.layer.0.attention.output.dense", "encoder.layer.0.output", 1),
        ("roberta", "post_ln_encoder", 2, "encoder.layer.0.attention.output.dense", "encoder.layer.0.output", 1),
        ("t5", "t5", 4, "encoder.block.0.layer.0.SelfAttention.o", "encoder.block.0.layer.1.DenseReluDense", 0),
        ("llama", "pre_ln_decoder", 2, "layers.0.self_attn.o_proj", "layers.0.mlp", 0),
    ],
)
def test_blocks_of_each_layout(arch, layout, blocks, attention_output, ffn, arg) -> None:
    found = find_blocks(tiny_model(arch))
    assert len(found) == blocks
    first = found[0]
    assert (first.layout, first.attention_output, first.ffn, first.ffn_input_arg) == (
        layout,
        attention_output,
        ffn,
        arg,
    )


def test_t5_decoder_blocks_name_cross_attention() -> None:
    found = find_blocks(tiny_model("t5"))
    assert [b.cross_attention_output is not None for b in found] == [False, False, True, True]
    assert found[2].ffn == "decoder.block.0.layer.2.DenseReluDense"


def test_blocks_are_found_through_adapter_hosts() -> None:
    model = mp.adapt(tiny_model("bert"), mp.create_config("pfeiffer", bottleneck_dim=4))
    assert len(find_blocks(model)) == 2


def test_unknown_architecture_names_the_structures_looked_for() -> None:
    with pytest.raises(ValueError, match=r"found no transformer blocks in MLP.*attention\.output\.dense.*o_proj"):
        find_blocks(MLP())


def test_t5_base_has_62_norms() -> None:
    """12 encoder blocks x 2 + final, 12 decoder blocks x 3 + final (spec §9f)."""
    config = T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, vocab_size=32128)
    with torch.device("meta"):
        model = T5Model(config)
    assert len(find_norms(model)) == 62


def test_is_norm_by_structure() -> None:
    llama = tiny_model("llama")
    assert is_norm(llama.norm) and is_norm(nn.LayerNorm(4))
    assert not is_norm(nn.Linear(4, 4)) and not is_norm(llama.layers[0].mlp)
