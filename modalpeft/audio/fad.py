"""Fréchet Audio Distance (FAD; Kilgour et al., Interspeech 2019) between generated audio and reference audio of a
genre, under an embedding model the user has the weights of.

FAD fits one Gaussian to the frame embeddings of each set and returns the Fréchet distance between them::

    FAD = ||mu_r - mu_g||² + Tr(S_r) + Tr(S_g) - 2 Tr((S_r S_g)^{1/2})

with the unbiased covariances (``numpy.cov``), as the reference implementation (google-research/frechet-audio-distance)
and ``fadtk`` compute it. Every embedding frame of every file counts as one sample (VGGish-style FAD pools the frames
of all clips). ``Tr((S_r S_g)^{1/2})`` is computed as the sum of the square roots of the eigenvalues of the symmetric
``S_r^{1/2} S_g S_r^{1/2}`` (same value as ``scipy.linalg.sqrtm``'s trace, tested; never complex, no ``eps`` offset
needed for singular covariances), in float64.

Embedders (any callable ``(samples at embedder.sampling_rate) -> (frames, D)`` with a ``sampling_rate`` works):

- :class:`EncodecEmbedder`: the continuous latents of an EnCodec encoder before quantisation (``fadtk``'s
  ``encodec-emb``), one frame per codec step (50 Hz for MusicGen's 32 kHz EnCodec). A MusicGen user has these weights
  already: ``"codec"`` in :class:`~modalpeft.audio.tasks.MusicGenTask` uses the model's own codec.
- :class:`ClapEmbedder`: a transformers CLAP model's projected audio embedding, one per window of the feature
  extractor's length (10 s for LAION-CLAP; a last window shorter than half of it is dropped, a longer one is
  repeat-padded by the feature extractor), as ``fadtk``'s ``clap-laion-*``.

:func:`load_embedder` builds either from a local folder or Hub name (read offline when ``HF_HUB_OFFLINE=1``).
``python -m modalpeft.audio.fad REFERENCE_DIR GENERATED_DIR --model PATH`` prints the FAD of two audio folders.

FAD is biased by the number of samples (Chung et al. 2025 / fadtk's FAD-∞ extrapolates it away): compare runs with
the same number of generated seconds.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from .data import AUDIO_SUFFIXES, load_audio


class AudioEmbedder(Protocol):
    sampling_rate: int

    def __call__(self, samples: np.ndarray) -> Tensor: ...


def gaussian(embeddings: Tensor | np.ndarray, name: str = "embeddings") -> tuple[np.ndarray, np.ndarray]:
    """The mean and unbiased covariance (float64) of ``(N, D)`` embeddings."""
    x = np.asarray(torch.as_tensor(embeddings).detach().cpu().double())
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(
            f"{name}: FAD needs a (frames, dim) array with at least 2 frames, got shape {tuple(x.shape)}; "
            "give it more (or longer) audio files."
        )
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: the embeddings hold NaN or inf values; check the audio and the embedding model.")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(
    reference: Tensor | np.ndarray | tuple[np.ndarray, np.ndarray],
    generated: Tensor | np.ndarray | tuple[np.ndarray, np.ndarray],
) -> float:
    """The Fréchet distance between Gaussians fitted to two ``(N, D)`` embedding sets (or given as ``(mu, sigma)``)."""
    mu_r, s_r = reference if isinstance(reference, tuple) else gaussian(reference, "reference")
    mu_g, s_g = generated if isinstance(generated, tuple) else gaussian(generated, "generated")
    if mu_r.shape != mu_g.shape:
        raise ValueError(
            f"the reference embeddings have dimension {mu_r.shape[0]} and the generated ones {mu_g.shape[0]}: "
            "embed both sets with the same model."
        )
    # Tr((S_r S_g)^{1/2}) = Tr((S_r^{1/2} S_g S_r^{1/2})^{1/2}): the same eigenvalues, and this one is symmetric PSD
    w, v = np.linalg.eigh(s_r)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s_g @ root)
    trace_root = float(np.sqrt(np.clip(inner, 0.0, None)).sum())
    diff = mu_r - mu_g
    return float(diff @ diff + np.trace(s_r) + np.trace(s_g) - 2.0 * trace_root)


class EncodecEmbedder:
    """The continuous encoder latents of a transformers ``EncodecModel`` (``(frames, hidden)`` per clip)."""

    def __init__(self, codec: nn.Module, device: str | torch.device = "cpu") -> None:
        if not hasattr(codec, "encoder") or not hasattr(getattr(codec, "config", None), "sampling_rate"):
            raise TypeError(
                f"EncodecEmbedder needs a transformers EncodecModel (an .encoder and a config with a sampling rate), "
                f"got {type(codec).__name__}; for MusicGen pass model.audio_encoder."
            )
        self.codec = codec.eval().to(device)
        self.device = torch.device(device)
        self.sampling_rate = int(codec.config.sampling_rate)
        self.min_samples = int(math.prod(codec.config.upsampling_ratios))

    @torch.no_grad()
    def __call__(self, samples: np.ndarray) -> Tensor:
        if len(samples) < self.min_samples:
            raise ValueError(f"{len(samples)} samples: shorter than one codec frame ({self.min_samples}).")
        ref = next(self.codec.parameters())
        x = torch.as_tensor(samples, dtype=ref.dtype, device=self.device).reshape(1, 1, -1)
        return self.codec.encoder(x)[0].T.float().cpu()  # (hidden, frames) -> (frames, hidden)


class ClapEmbedder:
    """A transformers ``ClapModel``'s normalised audio embedding, one per window of the feature extractor's length."""

    def __init__(self, model: nn.Module, feature_extractor: Any, device: str | torch.device = "cpu") -> None:
        if not hasattr(model, "get_audio_features"):
            raise TypeError(f"ClapEmbedder needs a transformers ClapModel, got {type(model).__name__}.")
        self.model = model.eval().to(device)
        self.features = feature_extractor
        self.device = torch.device(device)
        self.sampling_rate = int(feature_extractor.sampling_rate)
        self.window = int(feature_extractor.nb_max_samples)

    @torch.no_grad()
    def __call__(self, samples: np.ndarray) -> Tensor:
        starts = range(0, max(len(samples), 1), self.window)
        windows = [samples[s : s + self.window] for s in starts]
        windows = [w for i, w in enumerate(windows) if i == 0 or 2 * len(w) >= self.window]
        inputs = self.features(windows, sampling_rate=self.sampling_rate, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.model.get_audio_features(**inputs)
        return (out.pooler_output if hasattr(out, "pooler_output") else out).float().cpu()


def load_embedder(name_or_path: str, device: str | torch.device = "cpu") -> AudioEmbedder:
    """An embedder from a CLAP, EnCodec or MusicGen model (its codec) folder or Hub name."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as e:
        raise ValueError(
            f"{name_or_path!r}: no model config there ({e}); give the folder (or Hub name) of a CLAP, EnCodec or "
            "MusicGen model whose weights you have."
        ) from e
    kind = config.model_type
    if kind == "clap":
        from transformers import ClapFeatureExtractor, ClapModel

        return ClapEmbedder(ClapModel.from_pretrained(name_or_path), ClapFeatureExtractor.from_pretrained(name_or_path),
                            device)  # fmt: skip
    if kind == "encodec":
        from transformers import EncodecModel

        return EncodecEmbedder(EncodecModel.from_pretrained(name_or_path), device)
    if kind == "musicgen":
        from transformers import MusicgenForConditionalGeneration

        return EncodecEmbedder(MusicgenForConditionalGeneration.from_pretrained(name_or_path).audio_encoder, device)
    raise ValueError(
        f"{name_or_path!r} is a {kind!r} model; FAD here embeds with CLAP (e.g. laion/clap-htsat-unfused), EnCodec "
        "(e.g. facebook/encodec_32khz) or a MusicGen model's codec."
    )


def audio_files(folder: str | Path) -> list[Path]:
    """The audio files under ``folder`` (recursively, sorted)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder; give a folder of audio files ({', '.join(AUDIO_SUFFIXES)}).")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{root}: holds no audio files ({', '.join(AUDIO_SUFFIXES)}).")
    return files


def embed(
    audio: str | Path | Iterable[str | Path | np.ndarray],
    embedder: AudioEmbedder | Callable[[np.ndarray], Tensor],
    sampling_rate: int | None = None,
) -> Tensor:
    """The embedding frames of every clip, stacked ``(frames, D)``.

    ``audio``: a folder, or files and arrays; arrays must be at ``sampling_rate`` (the embedder's when ``None``), and
    are resampled to the embedder's rate otherwise; files are decoded and resampled by PyAV.
    """
    rate = int(embedder.sampling_rate)
    if sampling_rate is not None and (int(sampling_rate) != sampling_rate or sampling_rate <= 0):
        raise ValueError(f"sampling_rate={sampling_rate!r}: give the arrays' rate in Hz, a positive integer.")
    items: Sequence[Any] = audio_files(audio) if isinstance(audio, str | Path) else list(audio)
    frames = []
    for item in items:
        if isinstance(item, str | Path):
            samples = load_audio(item, rate)
        else:
            samples = np.asarray(item, dtype=np.float32).reshape(-1)
            if sampling_rate is not None and sampling_rate != rate:
                samples = _resample(samples, sampling_rate, rate)
        try:
            frames.append(embedder(samples))
        except ValueError as e:
            where = item if isinstance(item, str | Path) else f"clip {len(frames)}"
            raise ValueError(f"{where}: {e} Give longer clips or remove this one.") from e
    if not frames:
        raise ValueError("no audio to embed.")
    return torch.cat(frames)


def _resample(samples: np.ndarray, source: int, target: int) -> np.ndarray:
    from scipy.signal import resample_poly

    g = math.gcd(int(source), int(target))
    return resample_poly(samples, int(target) // g, int(source) // g).astype(np.float32)


def frechet_audio_distance(
    reference: str | Path | Iterable[str | Path | np.ndarray],
    generated: str | Path | Iterable[str | Path | np.ndarray],
    embedder: AudioEmbedder | str,
    sampling_rate: int | None = None,
) -> float:
    """FAD between two sets of audio (folders, files or arrays at ``sampling_rate``) under ``embedder`` (an
    embedder or a model folder / Hub name for :func:`load_embedder`)."""
    model = load_embedder(embedder) if isinstance(embedder, str) else embedder
    return frechet_distance(embed(reference, model, sampling_rate), embed(generated, model, sampling_rate))


__all__ = [
    "AudioEmbedder",
    "ClapEmbedder",
    "EncodecEmbedder",
    "audio_files",
    "embed",
    "frechet_audio_distance",
    "frechet_distance",
    "gaussian",
    "load_embedder",
]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modalpeft.audio.fad", description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", help="a folder of reference audio (real music of the target genre)")
    parser.add_argument("generated", help="a folder of generated audio")
    parser.add_argument("--model", required=True, help="a CLAP, EnCodec or MusicGen model folder or Hub name")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        fad = frechet_audio_distance(args.reference, args.generated, load_embedder(args.model, args.device))
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"FAD {fad:.4f} ({args.model})")


if __name__ == "__main__":
    main()
