"""The sequence stages of the music adapters: causality, cached steps equal full runs, padding, counts, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modalpeft.core.layers import AttentionStage, Bottleneck, DilatedConvStage
from modalpeft.core.layers.sequence import key_validity


def stage(kind: str, causal: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv":
        s = DilatedConvStage(6, kernel_size=3, dilations=(1, 2), se_reduction=2, causal=causal)
    else:
        s = AttentionStage(6, num_heads=2, ffn_mult=2, causal=causal)
    s.reset_adapter(False)
    return s.eval()


class Cache:
    """A stand-in for a transformers cache: only its identity matters when the stage has no ``layer_idx``."""


def run(s: nn.Module, z: torch.Tensor, mask: torch.Tensor | None = None, cache: object = None) -> torch.Tensor:
    s.context((z,), {"attention_mask": mask, "cache": cache})
    return s(z)


@pytest.mark.parametrize("kind", ["conv", "attention"])
def test_causal_output_at_t_does_not_depend_on_later_inputs(kind: str) -> None:
    s = stage(kind)
    z = torch.randn(2, 9, 6)
    out = run(s, z)
    for t in range(8):
        changed = z.clone()
        changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
        moved = run(s, changed)
        torch.testing.assert_close(moved[:, : t + 1], out[:, : t + 1], atol=0, rtol=0)
        assert not torch.allclose(moved[:, t + 1 :], out[:, t + 1 :])  # later positions do see the change


@pytest.mark.parametrize("kind", ["conv", "attention"])
def test_a_non_causal_stage_sees_the_future(kind: str) -> None:
    s = stage(kind, causal=False)
    z = torch.randn(1, 7, 6)
    changed = z.clone()
    changed[:, -1] = torch.randn(6)
    assert not torch.allclose(run(s, changed)[:, 0], run(s, z)[:, 0])


@pytest.mark.parametrize("kind", ["conv", "attention"])
def test_cached_steps_give_the_full_sequence_output(kind: str) -> None:
    s = stage(kind)
    z = torch.randn(2, 12, 6)
    full = run(s, z)
    cache, outs, start = Cache(), [], 0
    for size in (4, 1, 1, 3, 1, 2):
        outs.append(run(s, z[:, start : start + size], cache=cache))
        start += size
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-6, rtol=1e-5)
    # a new cache object starts a new sequence; a call without a cache keeps no state
    torch.testing.assert_close(run(s, z[:, :3], cache=Cache()), full[:, :3], atol=1e-6, rtol=1e-5)
    run(s, z)
    assert s._state is None


@pytest.mark.parametrize("kind", ["conv", "attention"])
def test_padded_positions_never_reach_real_ones(kind: str) -> None:
    """Left padding (mask 0) gives the real positions exactly the outputs of the unpadded sequence."""
    s = stage(kind)
    z = torch.randn(1, 6, 6)
    alone = run(s, z)
    padded = torch.cat([torch.randn(1, 3, 6) * 5, z], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(run(s, padded, mask)[:, 3:], alone, atol=1e-6, rtol=1e-5)
    boolean = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    boolean[..., :3] = False
    torch.testing.assert_close(run(s, padded, boolean)[:, 3:], alone, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(run(s, padded)[:, 3:], alone, atol=1e-4)  # without the mask they do


def test_key_validity_reads_every_mask_form() -> None:
    expected = torch.tensor([[False, True, True], [True, True, True]])
    assert key_validity(None, 2, 3) is None
    torch.testing.assert_close(key_validity(torch.tensor([[0, 1, 1], [1, 1, 1]]), 2, 3), expected)
    additive = torch.zeros(2, 1, 3, 5)
    additive[0, ..., 0] = torch.finfo(torch.float32).min
    additive[..., 3:] = torch.finfo(torch.float32).min  # a static cache's unused slots
    torch.testing.assert_close(key_validity(additive, 2, 3), expected)
    with pytest.raises(ValueError, match="covers 3 positions"):
        key_validity(torch.ones(2, 3), 2, 4)
    with pytest.raises(TypeError, match="attn_implementation"):
        key_validity(torch.ones(2, 3, 3), 2, 3)


def test_the_state_follows_the_cache_it_was_built_with() -> None:
    class Counted:
        def __init__(self, n: int) -> None:
            self.n = n

        def get_seq_length(self, layer_idx: int) -> int:
            return self.n

    s = stage("attention")
    s.layer_idx = 0
    with pytest.raises(ValueError, match="already holds 4 positions that this adapter never saw"):
        run(s, torch.randn(1, 1, 6), cache=Counted(4))
    cache = Counted(0)
    run(s, torch.randn(1, 3, 6), cache=cache)
    cache.n = 5  # cropped or grown behind the adapter's back
    with pytest.raises(ValueError, match="holds 5 positions but this adapter's state 3"):
        run(s, torch.randn(1, 1, 6), cache=cache)


def test_parameter_counts_follow_the_shapes() -> None:
    m, k, blocks, h = 6, 3, 2, 3  # conv: per block k·m² + m (dilated) and m² + m (1x1), SE m·h + h + h·m + m
    assert (
        sum(p.numel() for p in stage("conv").parameters()) == blocks * (k * m * m + m + m * m + m) + 2 * m * h + h + m
    )
    f = 2 * m  # attention: 2 LayerNorms, qkv, out, FFN
    expected = 2 * 2 * m + (3 * m * m + 3 * m) + (m * m + m) + (m * f + f) + (f * m + m)
    assert sum(p.numel() for p in stage("attention").parameters()) == expected


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="num_heads=4 must divide the bottleneck width 6"):
        AttentionStage(6, num_heads=4)
    with pytest.raises(ValueError, match="odd kernel_size, not 4"):
        DilatedConvStage(6, kernel_size=4, causal=False)
    with pytest.raises(ValueError, match="must be >= 1"):
        DilatedConvStage(6, dilations=(1, 0))


def test_bottleneck_with_a_middle_stage() -> None:
    """``s · drop(up(act(mid(down(h)))))`` on the output: identity at init, the stage between the projections."""
    torch.manual_seed(0)
    middle = stage("conv")
    layer = Bottleneck(10, 6, act="identity", dropout=0.5, dropout_at="output", middle=middle, scaling=0.5)
    h = torch.randn(2, 5, 10)
    torch.testing.assert_close(layer.post(h), h)  # up = 0
    layer.reset_adapter(False)
    layer.eval()
    middle.context((h,), {})
    expected = h + 0.5 * layer.up(middle(layer.down(h)))
    layer.context((h,), {})
    torch.testing.assert_close(layer.post(h), expected)
    layer.train()
    torch.manual_seed(1)
    kept = (layer.post(h) - h) != 0  # dropout acts on the branch's output, element by element
    assert 0 < kept.float().mean() < 1
    with pytest.raises(ValueError, match="cannot be combined with conv=True"):
        Bottleneck(10, 6, conv=True, middle=middle)


def test_a_copy_starts_without_the_decoding_state() -> None:
    import copy

    s = stage("conv")
    run(s, torch.randn(1, 3, 6), cache=Cache())
    assert s._state is not None and copy.deepcopy(s)._state is None
