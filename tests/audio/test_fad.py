"""Fréchet Audio Distance: the distance against scipy's matrix square root and closed forms, the EnCodec and CLAP
embedders on tiny random models built offline, loading them from folders, the command, and MusicGenTask's FAD."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

import modalpeft as mp
from modalpeft.audio.backbones import tiny_musicgen
from modalpeft.audio.data import wav_bytes
from modalpeft.audio.fad import (
    ClapEmbedder,
    EncodecEmbedder,
    embed,
    frechet_audio_distance,
    frechet_distance,
    load_embedder,
    main,
)
from modalpeft.audio.tasks import MusicGenTask

from .fixtures import RATE, write_music_folder, write_tiny_musicgen


def reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The reference implementation's formula (google-research/frechet-audio-distance, fadtk): scipy's sqrtm."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root))


def tiny_clap():
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig

    audio = ClapAudioConfig(
        window_size=4, spec_size=64, num_mel_bins=16, hidden_size=16, patch_embeds_hidden_size=8, depths=[1, 1],
        num_attention_heads=[2, 2], enable_fusion=False, projection_dim=8, patch_stride=(4, 4), patch_size=4,
    )  # fmt: skip
    text = ClapTextConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, projection_dim=8)  # fmt: skip
    torch.manual_seed(0)
    model = ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=8))
    features = ClapFeatureExtractor(feature_size=16, sampling_rate=8000, hop_length=80, max_length_s=1,
                                    fft_window_size=256, frequency_max=4000, truncation="rand_trunc",
                                    padding="repeatpad")  # fmt: skip
    return model, features


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    return tiny_musicgen().audio_encoder


def test_the_distance_is_the_reference_formula() -> None:
    g = np.random.default_rng(0)
    a = g.normal(size=(200, 6)) @ g.normal(size=(6, 6))
    b = g.normal(size=(150, 6)) @ g.normal(size=(6, 6)) + 0.5
    assert frechet_distance(a, b) == pytest.approx(reference_fd(a, b), rel=1e-8)
    assert frechet_distance(torch.tensor(a), torch.tensor(a)) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0, 3.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)  # same covariance
    # one dimension: (mu_a - mu_b)² + (sigma_a - sigma_b)²
    x, y = g.normal(1.0, 2.0, size=(500, 1)), g.normal(-1.0, 0.5, size=(400, 1))
    sa, sb = x.std(ddof=1), y.std(ddof=1)
    assert frechet_distance(x, y) == pytest.approx((x.mean() - y.mean()) ** 2 + (sa - sb) ** 2, rel=1e-10)
    # fewer frames than dimensions: singular covariances give a real, finite value (no eps needed)
    few = frechet_distance(a[:4], b[:3])
    assert np.isfinite(few) and few >= 0


def test_bad_embeddings_are_named() -> None:
    with pytest.raises(ValueError, match=r"reference: FAD needs a \(frames, dim\) array with at least 2 frames, got "
                                         r"shape \(1, 3\)"):  # fmt: skip
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="dimension 3 and the generated ones 4: embed both sets with the same model"):
        frechet_distance(np.random.rand(5, 3), np.random.rand(5, 4))
    with pytest.raises(ValueError, match="generated: the embeddings hold NaN"):
        frechet_distance(np.random.rand(5, 3), np.full((5, 3), np.nan))


def test_encodec_embedder_gives_latent_frames_and_reads_folders_and_arrays(tmp_path, codec) -> None:
    embedder = EncodecEmbedder(codec)
    assert embedder.sampling_rate == RATE
    tone = np.sin(np.arange(RATE) / RATE * 2 * np.pi * 220).astype(np.float32)
    frames = embedder(tone)
    expected = codec.encoder(torch.tensor(tone).reshape(1, 1, -1))[0].T
    assert frames.shape == (100, codec.config.hidden_size)  # 1 s at the codec's 100 Hz frames
    torch.testing.assert_close(frames, expected)
    folder = write_music_folder(tmp_path / "music", [1.0, 0.6], rate=RATE)
    from_files = embed(folder, embedder)
    assert from_files.shape == (100 + 60, codec.config.hidden_size)
    torch.testing.assert_close(from_files[:100], embed([folder / "tune_0.wav"], embedder))
    # arrays at another rate are resampled: 8 kHz in, the same 100 Hz frames out
    up = np.interp(np.arange(8000) / 8000, np.arange(RATE) / RATE, tone).astype(np.float32)
    assert embed([up], embedder, sampling_rate=8000).shape == (100, codec.config.hidden_size)
    assert frechet_audio_distance(folder, folder, embedder) == pytest.approx(0.0, abs=1e-6)
    other = write_music_folder(tmp_path / "other", [0.8, 0.8], rate=RATE * 2)
    assert frechet_audio_distance(folder, other, embedder) > 0
    with pytest.raises(ValueError, match=r"clip 0: 3 samples: shorter than one codec frame \(16\)"):
        embed([np.zeros(3, np.float32)], embedder)
    with pytest.raises(ValueError, match=r"sampling_rate=-8000: give the arrays' rate in Hz"):
        embed([up], embedder, sampling_rate=-8000)
    with pytest.raises(ValueError, match=r"sampling_rate=0: give the codec's rate in Hz"):
        embed([folder / "tune_0.wav"], type("Zero", (), {"sampling_rate": 0})())
    with pytest.raises(TypeError, match="for MusicGen pass model.audio_encoder"):
        EncodecEmbedder(torch.nn.Linear(2, 2))


def test_clap_embedder_embeds_windows(tmp_path) -> None:
    model, features = tiny_clap()
    embedder = ClapEmbedder(model, features)
    assert (embedder.sampling_rate, embedder.window) == (8000, 8000)
    g = np.random.default_rng(0)
    clip = g.normal(scale=0.1, size=int(2.6 * 8000)).astype(np.float32)  # windows of 1, 1 and 0.6 s
    out = embedder(clip)
    assert out.shape == (3, 8)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))  # CLAP's normalised projection
    inputs = features([clip[:8000]], sampling_rate=8000, return_tensors="pt")
    torch.testing.assert_close(out[:1], model.get_audio_features(**inputs).pooler_output.detach())
    assert embedder(clip[: int(1.3 * 8000)]).shape == (1, 8)  # a last window under half is dropped
    model.save_pretrained(tmp_path / "clap")
    features.save_pretrained(tmp_path / "clap")
    loaded = load_embedder(str(tmp_path / "clap"))
    assert isinstance(loaded, ClapEmbedder)
    torch.testing.assert_close(loaded(clip), out)


def test_load_embedder_reads_encodec_and_musicgen_folders_and_names_other_models(tmp_path, codec) -> None:
    codec.save_pretrained(tmp_path / "encodec")
    model_dir = write_tiny_musicgen(tmp_path / "musicgen")
    tone = np.random.default_rng(0).normal(size=RATE).astype(np.float32)
    for folder in (tmp_path / "encodec", model_dir):
        embedder = load_embedder(str(folder))
        assert isinstance(embedder, EncodecEmbedder)
        torch.testing.assert_close(embedder(tone), EncodecEmbedder(codec)(tone))
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=4, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match=r"is a 'bert' model; FAD here embeds with CLAP"):
        load_embedder(str(tmp_path / "b"))
    with pytest.raises(ValueError, match="no model config there"):
        load_embedder(str(tmp_path / "nothing"))


def test_the_command_prints_the_fad_and_names_bad_folders(tmp_path, codec, capsys) -> None:
    codec.save_pretrained(tmp_path / "encodec")
    a = write_music_folder(tmp_path / "a", [1.0, 1.0], rate=RATE)
    b = write_music_folder(tmp_path / "b", [1.0], rate=RATE * 2)
    main([str(a), str(b), "--model", str(tmp_path / "encodec")])
    expected = frechet_audio_distance(a, b, EncodecEmbedder(codec))
    assert capsys.readouterr().out.strip() == f"FAD {expected:.4f} ({tmp_path / 'encodec'})"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a), str(tmp_path / "empty"), "--model", str(tmp_path / "encodec")])
    assert exit_info.value.code == 2
    assert "empty: holds no audio files" in capsys.readouterr().err


def test_musicgen_task_computes_the_fad_of_its_samples(tmp_path) -> None:
    from transformers import AutoTokenizer

    model_dir = write_tiny_musicgen(tmp_path / "model")
    reference = write_music_folder(tmp_path / "reference", [1.0, 1.0], rate=RATE)
    adapter = mp.MusicAdapterConfig(kind="linear", bottleneck=4)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="none: holds no audio files"):
        MusicGenTask(tiny_musicgen(), adapter=adapter, fad_reference=str(tmp_path / "none"), sample_prompts=["a"])
    with pytest.raises(ValueError, match="needs sample_prompts"):
        MusicGenTask(tiny_musicgen(), adapter=adapter, fad_reference=str(reference))
    task = MusicGenTask(mp.audio.tasks.musicgen(str(model_dir)), adapter=adapter, fad_reference=str(reference),
                        sample_prompts=["a"])  # fmt: skip
    files = task.generate_wav(["the cat", "a dog"], AutoTokenizer.from_pretrained(model_dir), tmp_path / "s", 0.5)
    fad = task.fad(files, reference)
    codec = task.musicgen[0].audio_encoder
    assert fad["fad"] == pytest.approx(frechet_audio_distance(reference, files, EncodecEmbedder(codec)))
    assert fad["reference_frames"] == 200 and fad["generated_frames"] > 2
    json.dumps(fad)  # what fit's end writes to samples/fad.json


def test_generated_audio_files_are_read_back(tmp_path, codec) -> None:
    """A generated WAV (16-bit PCM) embeds as the float samples it was written from, to the PCM step."""
    g = np.random.default_rng(1)
    samples = (0.2 * g.normal(size=RATE)).astype(np.float32)
    Path(tmp_path / "x.wav").write_bytes(wav_bytes(samples, RATE))
    embedder = EncodecEmbedder(codec)
    torch.testing.assert_close(embed([tmp_path / "x.wav"], embedder), embedder(samples), atol=1e-3, rtol=1e-3)
