"""Adapter files into pipelines: ``save_adapter`` -> ``load_into_pipeline`` (scale, fuse), and adapters that do
not fit (SD-2.1 into SDXL)."""

from __future__ import annotations

import pytest
import torch

import modalpeft as mp
from modalpeft.core.inject import hosts
from modalpeft.core.state import CONFIG_NAME, WEIGHTS_NAME, atomic_write
from modalpeft.diffusion import DiffuseKronAConfig, load_into_pipeline, set_scale

from .unets import SD21_BASE, SDXL, generate, meta_unet, tiny_pipeline, tiny_unet, unet_inputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapter")
    model = mp.adapt(tiny_unet(cross_attention_dim=32), DiffuseKronAConfig(a1=4, a2=4, scale=0.8, init_weights=False))
    model.save_adapter(directory)
    return directory, model


@pytest.mark.slow
def test_load_into_pipeline_scale_and_fuse(saved):
    directory, trained = saved
    pipe = tiny_pipeline()
    base_images = generate(pipe)
    unet = pipe.unet
    adapted = load_into_pipeline(pipe, directory, scale=0.5)
    assert pipe.unet is unet and len(list(hosts(unet))) == len(list(hosts(trained.base_model)))
    x, t, e = unet_inputs(text_dim=32)
    set_scale(trained, 0.5)
    torch.testing.assert_close(pipe.unet(x, t, e).sample, trained(x, t, e).sample, rtol=1e-5, atol=1e-5)
    images = generate(pipe)
    assert (images - base_images).abs().max() > 1e-3
    adapted.merge_adapter()  # fused
    torch.testing.assert_close(generate(pipe), images, rtol=1e-4, atol=1e-4)
    set_scale(adapted, 0.0)  # a fused adapter is rescaled through unmerge / merge
    torch.testing.assert_close(generate(pipe), base_images, rtol=1e-4, atol=1e-4)
    assert adapted.peft_config["default"].scale == 0.0


def test_load_into_pipeline_bad_input(saved):
    directory, _ = saved
    with pytest.raises(TypeError, match="needs a diffusers pipeline with a `unet`"):
        load_into_pipeline(object(), directory)
    with pytest.raises(TypeError, match="scale='1' must be a float"):
        set_scale(saved[1], "1")


def test_an_sd21_adapter_does_not_load_into_an_sdxl_unet(tmp_path):
    sd21 = mp.adapt(meta_unet(SD21_BASE), DiffuseKronAConfig())  # its save_adapter, with the meta tensors filled
    state = {k: torch.zeros(v.shape) for k, v in sd21.adapter_state_dict().items()}
    atomic_write({WEIGHTS_NAME: state, CONFIG_NAME: {**sd21.peft_config["default"].to_dict()}}, tmp_path)
    sdxl = meta_unet(SDXL)
    before = [name for name, _ in sdxl.named_modules()]
    with pytest.raises(ValueError) as info:
        mp.load_adapter(sdxl, tmp_path)
    message = str(info.value)
    assert "missing keys" in message and "unexpected keys" in message and "shape mismatches" in message
    # SD-2.1 has a cross-attention level at 320 (down_blocks.0), SDXL does not; k/v read 1024 vs 2048 text dims
    assert "unexpected keys (128): ['down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.adapters.A" in message
    assert (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.adapters.B: saved (10, 128) vs model (10, 256)"
        in (message)
    )
    assert [name for name, _ in sdxl.named_modules()] == before  # nothing was left attached
