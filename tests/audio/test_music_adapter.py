"""music_adapter on transformers' MusicGen: placement, causality, cached generation, padding, counts, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import modalpeft as mp
from modalpeft.audio.backbones import musicgen_decoder, tiny_musicgen
from modalpeft.core.layers import Bottleneck

KINDS = ["linear", "conv", "transformer"]
SETTINGS = {"conv": {"dilations": [1, 2], "se_reduction": 2}, "transformer": {"num_heads": 2, "ffn_mult": 2}}


def adapted(kind: str, model: torch.nn.Module | None = None, **kwargs) -> mp.AdaptedModel:
    torch.manual_seed(0)
    model = musicgen_decoder("test") if model is None else model
    config = mp.MusicAdapterConfig(kind=kind, bottleneck=8, init_weights=False, dropout=0.0, **SETTINGS.get(kind, {}))
    for key, value in kwargs.items():
        setattr(config, key, value)
    return mp.adapt(model.eval(), config)


def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False, **kwargs).logits


def test_placement_after_every_decoder_block_only() -> None:
    model = adapted("linear", tiny_musicgen())
    hosts = [n for n, _ in mp.core.inject.hosts(model.base_model)]
    assert hosts == ["decoder.model.decoder.layers.0", "decoder.model.decoder.layers.1"]  # not T5's blocks, not EnCodec
    chosen = adapted("conv", target_modules=["layers.1"])
    assert [n for n, _ in mp.core.inject.hosts(chosen.base_model)] == ["model.decoder.layers.1"]
    stage = chosen.base_model.model.decoder.layers[1].adapters["default"].middle
    assert stage.causal and stage.layer_idx == 1  # causal because the block's self-attention is


@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_and_counts(kind: str) -> None:
    torch.manual_seed(0)
    base = musicgen_decoder("test").eval()
    ids = torch.randint(0, 16, (4, 7))
    expected = logits(base, ids)
    config = mp.MusicAdapterConfig(kind=kind, bottleneck=8, **SETTINGS.get(kind, {}))
    model = mp.adapt(base, config)
    torch.testing.assert_close(logits(model, ids), expected)
    d, m, blocks = 16, 8, 2  # the paper's designs (module docstring), from the shapes
    stage = {"linear": 0, "conv": 2 * (3 * m * m + m + m * m + m) + (m * 4 + 4 + 4 * m + m)}
    stage["transformer"] = 4 * m + 3 * m * m + 3 * m + m * m + m + (m * 2 * m + 2 * m) + (2 * m * m + m)
    assert model.trainable_summary()["trainable"] == blocks * (2 * d * m + m + d + stage[kind])


@pytest.mark.parametrize("kind", ["conv", "transformer"])
def test_logits_at_t_do_not_depend_on_codes_after_t(kind: str) -> None:
    model = adapted(kind)
    ids = torch.randint(0, 16, (2, 10))
    out = logits(model, ids)
    for t in (2, 6):
        changed = ids.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 5) % 16
        moved = logits(model, changed)
        torch.testing.assert_close(moved[:, : t + 1], out[:, : t + 1], atol=0, rtol=0)
        assert not torch.allclose(moved[:, t + 1 :], out[:, t + 1 :])


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_full_runs(kind: str) -> None:
    """Feeding the codes one step at a time through the cache gives the full run's logits, and generate() with the
    cache gives the tokens of generate() without it."""
    model = adapted(kind)
    ids = torch.randint(0, 16, (4, 9))
    full = logits(model, ids)
    out = model(input_ids=ids[:, :4], use_cache=True)
    steps, cache = [out.logits], out.cache
    for t in range(4, 9):
        out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    prompt = torch.full((4, 1), 16)
    kwargs = {"max_new_tokens": 14, "do_sample": False, "num_return_sequences": 1}
    torch.testing.assert_close(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


@pytest.mark.parametrize("kind", ["conv", "transformer"])
def test_cached_decoding_needs_the_adapters_state(kind: str, monkeypatch) -> None:
    """Without the kept past (each step seen alone) the cached logits differ: the equality above is not trivial."""
    model = adapted(kind)
    ids = torch.randint(0, 16, (4, 6))
    full = logits(model, ids)
    from modalpeft.core.layers.sequence import SequenceStage

    monkeypatch.setattr(SequenceStage, "_resume", lambda self, cache, past, batch: None)
    out = model(input_ids=ids[:, :5], use_cache=True)
    step = model(input_ids=ids[:, 5:], cache=out.cache, use_cache=True).logits
    assert not torch.allclose(step, full[:, 5:], atol=1e-4)


@pytest.mark.parametrize("kind", ["conv", "transformer"])
def test_padded_positions_do_not_reach_the_real_ones(kind: str) -> None:
    """With left padding, changing the codes under the mask leaves every real position's logits unchanged (the
    host's attention ignores them; the adapters must too)."""
    model = adapted(kind)
    ids = torch.randint(0, 16, (4, 8))
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[:2, :3] = 0  # the first batch row's codebooks are padded for 3 steps
    out = logits(model, ids, attention_mask=mask)
    changed = ids.clone()
    changed[:2, :3] = (changed[:2, :3] + 7) % 16
    torch.testing.assert_close(logits(model, changed, attention_mask=mask)[:2, 3:], out[:2, 3:], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits(model, changed)[:2, 3:], logits(model, ids)[:2, 3:], atol=1e-4)


def test_conditional_generation_with_adapters_is_deterministic_and_cached_exactly() -> None:
    model = adapted("transformer", tiny_musicgen())
    text = torch.randint(0, 128, (2, 5))
    kwargs = {"input_ids": text, "attention_mask": torch.ones_like(text), "max_new_tokens": 12, "do_sample": False}
    kwargs["num_return_sequences"] = 1
    with_cache = model.generate(**kwargs, return_dict_in_generate=True).sequences
    without = model.generate(**kwargs, use_cache=False, return_dict_in_generate=True).sequences
    torch.testing.assert_close(with_cache, without)


def test_bad_input_names_the_value_and_the_fix() -> None:
    with pytest.raises(
        ValueError, match=r"bottleneck=32 is larger than the width 16 of 'model.decoder.layers.0'.*<= 16"
    ):
        mp.adapt(musicgen_decoder("test"), mp.MusicAdapterConfig(bottleneck=32))
    with pytest.raises(ValueError, match=r"causal=False on 'model.decoder.layers.0'.*Use causal=None or True"):
        mp.adapt(musicgen_decoder("test"), mp.MusicAdapterConfig(kind="conv", bottleneck=4, causal=False))
    with pytest.raises(ValueError, match=r"kernel_size=4 with causal=False.*odd kernel"):
        mp.MusicAdapterConfig(kind="conv", kernel_size=4, causal=False)
    with pytest.raises(ValueError, match=r"num_heads=3 does not divide bottleneck=8"):
        mp.MusicAdapterConfig(kind="transformer", bottleneck=8, num_heads=3)
    with pytest.raises(ValueError, match=r"dilations=\[1, 0\]"):
        mp.MusicAdapterConfig(kind="conv", dilations=[1, 0])
    with pytest.raises(ValueError, match=r"kind='lstm' is not valid"):
        mp.MusicAdapterConfig(kind="lstm")
    with pytest.raises(ValueError, match=r"placement='before_block' is not valid"):
        mp.MusicAdapterConfig(placement="before_block")
    with pytest.raises(ValueError, match="found no decoder block list"):
        mp.adapt(torch.nn.Sequential(torch.nn.Linear(4, 4)), mp.MusicAdapterConfig(bottleneck=2))


def official_adapter(residual, down: torch.nn.Linear, up: torch.nn.Linear, p: float, training: bool):
    """A transcription of the released ``Adapter.forward`` (ACMMM_Adapters @ fd31113, ``musicgen/Training.py``):
    ``x = adapter_up(GELU(adapter_down(residual))); return dropout(x + residual)``."""
    x = F.linear(F.gelu(F.linear(residual, down.weight, down.bias)), up.weight, up.bias)
    return F.dropout(x + residual, p, training)


@torch.no_grad()
def test_linear_adapter_equals_the_released_adapter_in_evaluation_and_drops_only_its_branch_in_training() -> None:
    model = adapted("linear", dropout=0.1)
    adapter = next(m for m in model.modules() if isinstance(m, Bottleneck))
    h = torch.randn(4, 50, adapter.down.in_features, generator=torch.Generator().manual_seed(0))
    adapter.eval()
    expected = official_adapter(h, adapter.down, adapter.up, 0.1, training=False)
    torch.testing.assert_close(h + adapter.branch(h), expected, atol=0, rtol=0)
    adapter.train()  # the documented difference: the released adapter also drops the frozen residual stream
    branch = (expected - h) / 0.9
    got = h + adapter.branch(h)
    kept = (got - h - branch).abs() < 1e-5
    dropped = (got - h).abs() == 0
    assert bool((kept | dropped).all()) and 0.05 < dropped.float().mean() < 0.15
