"""LoKr export: the ``kron`` layout and peft LoKr adapters as LyCORIS / kohya ``.safetensors`` that the
``lycoris-lora`` package merges onto the same UNet with the same outputs; the ``official`` layout refused."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import modalpeft as mp
from modalpeft.diffusion import DiffuseKronAConfig, export_lokr, load_lokr

from .unets import tiny_unet, unet_inputs

lycoris_utils = pytest.importorskip("lycoris.utils", reason="lycoris-lora (the dev extra) reads the exported files")


def lycoris_outputs(path, inputs) -> torch.Tensor:
    """A fresh UNet with the file merged by LyCORIS's own loader (``lycoris.utils.merge``, kohya key names)."""
    unet = tiny_unet()
    state = load_file(path)
    lycoris_utils.merge([], unet, state, 1.0)
    return unet(*inputs).sample


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        DiffuseKronAConfig(a1=4, a2=4, layout="kron", scale=0.7, init_weights=False),
        peft.LoKrConfig(r=2, alpha=3, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_weights=False),
        peft.LoKrConfig(r=64, alpha=5, target_modules=["attn2.to_k", "attn1.to_v"], init_weights=False),  # full w2
    ],
    ids=["diffusekrona-kron", "peft-lokr", "peft-lokr-full"],
)
def test_lycoris_loads_the_export_with_the_same_outputs(config, tmp_path):
    inputs = unet_inputs()
    model = mp.adapt(tiny_unet(), config)
    want = model(*inputs).sample
    path = tmp_path / "subject.safetensors"
    export_lokr(model, path)
    keys = load_file(path)
    assert all(k.startswith("lora_unet_") and k.rsplit(".", 1)[1].startswith(("lokr_w", "alpha")) for k in keys)
    if isinstance(config, DiffuseKronAConfig):
        name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
        assert keys[f"{name}.lokr_w1"].shape == (4, 4) and keys[f"{name}.lokr_w2"].shape == (8, 8)
        assert len(keys) == 3 * 8 * 7  # 8 targets in each of 7 transformer blocks (2 down, 1 mid, 4 up); w1, w2, alpha
    if isinstance(config, peft.LoKrConfig):  # r=64: both factors full; r=2: w2 low-rank
        assert any(k.endswith(".lokr_w2_a") for k in keys) == (config.r == 2)
    assert (want - tiny_unet()(*inputs).sample).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(lycoris_outputs(path, inputs), want, rtol=1e-5, atol=1e-5)


def test_official_layout_and_other_adapters_are_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "a.safetensors"
    official = mp.adapt(tiny_unet(), DiffuseKronAConfig(a1=4, a2=4, init_weights=False))
    with pytest.raises(ValueError, match="layout='official' cannot be written as LoKr.*merge_and_unload"):
        export_lokr(official, path)
    ssf = mp.adapt(tiny_unet(), mp.SSFConfig(target_modules=["to_out.0"]))
    with pytest.raises(ValueError, match="to_out.0: ScaleShift is not a Kronecker adapter"):
        export_lokr(ssf, path)
    kron = mp.adapt(tiny_unet(), DiffuseKronAConfig(a1=4, a2=4, layout="kron"))
    kron.merge_adapter()
    with pytest.raises(ValueError, match="is merged; call unmerge_adapter"):
        export_lokr(kron, path)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export_lokr(kron, tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []


def test_load_lokr_round_trip_and_a_file_for_another_model(tmp_path):
    inputs = unet_inputs()
    model = mp.adapt(tiny_unet(), DiffuseKronAConfig(a1=4, a2=4, layout="kron", scale=0.7, init_weights=False))
    export_lokr(model, tmp_path / "mine.safetensors")
    loaded = load_lokr(tiny_unet(), tmp_path / "mine.safetensors")
    torch.testing.assert_close(loaded(*inputs).sample, model(*inputs).sample, rtol=1e-5, atol=1e-5)
    other = mp.adapt(  # another UNet: three levels, text width 32, so k/v of attn2 read 32 and a level is new
        tiny_unet(
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32,
        ),
        DiffuseKronAConfig(a1=4, a2=4, layout="kron"),
    )
    export_lokr(other, tmp_path / "other.safetensors")
    unet = tiny_unet()
    before = [name for name, _ in unet.named_modules()]
    with pytest.raises(ValueError, match=r"does not fit this UNet2DConditionModel") as info:
        load_lokr(unet, tmp_path / "other.safetensors")
    assert "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_to_k" in str(info.value)
    assert "attn2_to_k: w1 ⊗ w2 is (32, 32), the layer's weight (32, 24)" in str(info.value)
    assert [name for name, _ in unet.named_modules()] == before
