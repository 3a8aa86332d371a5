"""Small offline files the audio tests use: a tiny MusicGen folder with a tokenizer, and captioned WAV folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from modalpeft.audio.backbones import tiny_musicgen
from modalpeft.audio.data import wav_bytes

from ..text.fixtures import write_tokenizer

RATE = 1600  # the tiny MusicGen's codec rate


def write_tiny_musicgen(folder: Path) -> Path:
    """The tiny random MusicGen (seed 0) and a 128-entry WordPiece tokenizer, loadable by name = the folder."""
    torch.manual_seed(0)
    tiny_musicgen().save_pretrained(folder)
    return write_tokenizer(folder)


def write_music_folder(folder: Path, seconds: list[float], rate: int = 8000, captions: str = "csv") -> Path:
    """Tones of the given lengths (at ``rate``, resampled by the loader) as ``tune_<i>.wav`` and a caption file."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, length in enumerate(seconds):
        t = np.arange(int(length * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * (220 + 55 * i) * t) * (1 + 0.5 * np.sin(2 * np.pi * 2 * t))
        (folder / f"tune_{i}.wav").write_bytes(wav_bytes(tone, rate))
        names.append(f"tune_{i}.wav")
    words = ["the cat sat", "the dog ran fast", "a good film", "the mat was slow"]
    if captions == "csv":
        rows = ["file,caption", *(f"{n},{words[i % 4]}" for i, n in enumerate(names))]
        (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    else:
        rows = [f'{{"file": "{n}", "caption": "{words[i % 4]}"}}' for i, n in enumerate(names)]
        (folder / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return folder
