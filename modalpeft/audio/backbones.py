"""MusicGen models: the real decoder shapes, tiny offline builds with random weights, and loading by name.

MusicGen (Copet et al., 2023, https://arxiv.org/abs/2306.05284) is a T5 text encoder, an EnCodec audio codec
(32 kHz, 50 Hz frames, 4 codebooks of 2048 codes) and a decoder-only transformer over the codes with the codebook
delay pattern. transformers implements it as ``MusicgenForConditionalGeneration`` (all three) and
``MusicgenForCausalLM`` (the decoder with its LM heads). No MusicGen weights exist offline: tests build tiny
models with random weights, benchmarks the real decoder shapes with random weights.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

DecoderSize = Literal["test", "small", "medium", "large"]

DECODER_SHAPES: dict[str, dict[str, int]] = {
    "test": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 32},
    "small": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "ffn_dim": 4096},
    "medium": {"hidden_size": 1536, "num_hidden_layers": 48, "num_attention_heads": 24, "ffn_dim": 6144},
    "large": {"hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32, "ffn_dim": 8192},
}
"""The decoders of ``facebook/musicgen-{small,medium,large}`` (audiocraft's 300M, 1.5B and 3.3B; as transformers builds
them the small decoder has 420M parameters with its cross-attention; 4 codebooks of 2048 codes) and a
test size."""


def decoder_config(size: DecoderSize = "test", **overrides: Any) -> Any:
    """A ``MusicgenDecoderConfig`` of one of :data:`DECODER_SHAPES` (``test``: 2 codebooks of 16 codes, 256
    positions; the others: 4 codebooks of 2048 codes, 2048 positions), pad/bos/start ids = the codebook size."""
    from transformers import MusicgenDecoderConfig

    if size not in DECODER_SHAPES:
        raise ValueError(f"size={size!r} is not valid; choose one of {list(DECODER_SHAPES)}.")
    codes = 16 if size == "test" else 2048
    kwargs: dict[str, Any] = {
        **DECODER_SHAPES[size],
        "vocab_size": codes,
        "num_codebooks": 2 if size == "test" else 4,
        "max_position_embeddings": 256 if size == "test" else 2048,
        "pad_token_id": codes,
        "bos_token_id": codes,
        "decoder_start_token_id": codes,
    }
    kwargs.update(overrides)
    return MusicgenDecoderConfig(**kwargs)


def musicgen_decoder(size: DecoderSize = "test", **overrides: Any) -> nn.Module:
    """A ``MusicgenForCausalLM`` of a :func:`decoder_config`, with random weights (seed the caller's RNG)."""
    from transformers import MusicgenForCausalLM

    return MusicgenForCausalLM(decoder_config(size, **overrides))


def tiny_musicgen(**decoder_overrides: Any) -> nn.Module:
    """A tiny ``MusicgenForConditionalGeneration`` with random weights, built offline: a 1-layer T5 text encoder
    (vocabulary 128, width 16), an EnCodec at 1,600 Hz with 100 Hz frames and 2 codebooks of 16 codes, and the
    ``test`` decoder."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenForConditionalGeneration, T5Config

    codec = EncodecConfig(
        sampling_rate=1600,
        audio_channels=1,
        num_filters=4,
        hidden_size=8,
        upsampling_ratios=[4, 4],
        codebook_size=16,
        codebook_dim=8,
        num_lstm_layers=1,
        num_residual_layers=1,
        target_bandwidths=[0.8],  # 1000·0.8 / (100 Hz · log2(16) bits) = 2 quantizers
        kernel_size=3,
        last_kernel_size=3,
        residual_kernel_size=3,
    )
    text = T5Config(vocab_size=128, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    decoder = decoder_config("test", **decoder_overrides)
    ids = {k: decoder.pad_token_id for k in ("pad_token_id", "bos_token_id", "decoder_start_token_id")}
    config = MusicgenConfig(
        text_encoder=text.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict(), **ids
    )
    return MusicgenForConditionalGeneration(config)


SYMBOLIC_SHAPES: dict[str, dict[str, int]] = {
    "test": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 32},
    "demo": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "ffn_dim": 512},
}
"""Symbolic music LMs: ``demo`` is the committed pretrained model's shape (1,074,304 parameters, of which the 4
cross-attentions' 263,168 stay unused without a text condition); ``test`` a tiny one."""


def symbolic_music_lm(
    size: Literal["test", "demo"] = "demo", vocab_size: int | None = None, **overrides: Any
) -> nn.Module:
    """A MusicGen decoder over symbolic tokens: ``MusicgenForCausalLM`` with one codebook whose codes are the tokens of
    :class:`~modalpeft.audio.symbolic.MelodyTokenizer` (``vocab_size``, default its size), start/pad id = the
    vocabulary size, sinusoidal positions up to 1,024 tokens; random weights (seed the caller's RNG). The music
    adapters, peft and every MusicGen code path run on it unchanged."""
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    if size not in SYMBOLIC_SHAPES:
        raise ValueError(f"size={size!r} is not valid; choose one of {list(SYMBOLIC_SHAPES)}.")
    if vocab_size is None:
        from .symbolic import MelodyTokenizer

        vocab_size = len(MelodyTokenizer())
    kwargs: dict[str, Any] = {
        **SYMBOLIC_SHAPES[size],
        "vocab_size": vocab_size,
        "num_codebooks": 1,
        "max_position_embeddings": 1024,
        "pad_token_id": vocab_size,
        "bos_token_id": vocab_size,
        "decoder_start_token_id": vocab_size,
    }
    kwargs.update(overrides)
    return MusicgenForCausalLM(MusicgenDecoderConfig(**kwargs))


__all__ = [
    "DECODER_SHAPES",
    "SYMBOLIC_SHAPES",
    "decoder_config",
    "musicgen_decoder",
    "symbolic_music_lm",
    "tiny_musicgen",
]
