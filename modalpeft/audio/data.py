"""Music data: an audio folder with captions, cut into clips, resampled and encoded once into cached codec codes.

A folder holds audio files (``.wav``, ``.flac``, ``.mp3``, ``.ogg``, ``.opus``, ``.m4a``, ``.aif(f)``, decoded with
PyAV, down-mixed to mono and resampled to the codec's rate) and one caption file beside them:
``captions.csv`` (a header with a ``file`` column and a ``caption`` column) or ``captions.jsonl`` (one
``{"file": ..., "caption": ...}`` per line); ``file`` is the path relative to the folder. Each file is cut into
non-overlapping clips of ``clip_seconds`` (the paper cuts 30 s clips; the rest of a file is dropped), every clip
of a file shares its caption, and a seeded fraction of the files is held out for validation.

The clips are encoded by the model's codec (EnCodec for MusicGen) once: :meth:`MusicCaptionsDataModule.attach_codec`
(which :class:`~modalpeft.audio.tasks.MusicGenTask` calls in its ``setup``) encodes every clip and caches the codes
in ``cache_dir`` as safetensors, keyed by the codec, the file (path, size, modification time) and the clip
settings; later runs read the cache. Batches are dicts: the caption's ``input_ids`` and ``attention_mask`` and the
clip's ``codes`` ``(B, K, T)``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from ..core.state import atomic_write
from ..lightning.data import EpochSeededSampler

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aif", ".aiff")
CAPTION_FILES = ("captions.csv", "captions.jsonl")


def load_audio(path: str | Path, sampling_rate: int) -> np.ndarray:
    """A file's audio as float32 mono samples at ``sampling_rate`` (PyAV: decode, resample, average the channels).

    Raises:
        ValueError: the file cannot be decoded (its path named).
    """
    import av

    if int(sampling_rate) != sampling_rate or sampling_rate <= 0:
        raise ValueError(f"sampling_rate={sampling_rate!r}: give the codec's rate in Hz, a positive integer.")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError("it has no audio stream")
            # planar float at the target rate, channels kept: they are averaged below (FFmpeg's own down-mix to mono
            # sums at -3 dB per channel, which can clip)
            resampler = av.AudioResampler(format="fltp", rate=int(sampling_rate))
            chunks = []
            for frame in container.decode(container.streams.audio[0]):
                chunks.extend(out.to_ndarray().mean(axis=0) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().mean(axis=0) for out in resampler.resample(None))
    except (av.error.FFmpegError, ValueError) as e:
        raise ValueError(
            f"{path}: cannot decode this audio file ({e}); convert it to WAV or FLAC, or remove it from the folder."
        ) from e
    if not chunks:
        raise ValueError(f"{path}: the audio stream holds no samples; remove the file from the folder.")
    return np.concatenate(chunks).astype(np.float32)


def wav_bytes(audio: np.ndarray, sampling_rate: int) -> bytes:
    """``audio`` (float, ``(N,)`` or ``(C, N)``) as a 16-bit PCM WAV file's bytes."""
    from scipy.io import wavfile

    pcm = (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767).astype(np.int16)
    buffer = io.BytesIO()
    wavfile.write(buffer, int(sampling_rate), pcm.T if pcm.ndim == 2 else pcm)
    return buffer.getvalue()


def read_captions(folder: str | Path) -> dict[str, str]:
    """``{relative file: caption}`` from the folder's ``captions.csv`` or ``captions.jsonl``."""
    folder = Path(folder)
    found = [folder / name for name in CAPTION_FILES if (folder / name).is_file()]
    if not found:
        raise ValueError(
            f"{folder} has no caption file; add captions.csv (columns file,caption) or captions.jsonl "
            '({"file": ..., "caption": ...} per line) beside the audio files.'
        )
    path = found[0]
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg}); fix or remove it.") from e
    else:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
    captions = {}
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("file") or row.get("caption") is None:
            raise ValueError(f"{path}, entry {number}: needs a 'file' and a 'caption' ({row!r}).")
        captions[str(row["file"])] = str(row["caption"])
    return captions


class MusicCaptionsDataModule(pl.LightningDataModule):
    """Captioned music clips as codec codes (see the module docstring).

    Args:
        data_dir: the folder of audio files and their caption file.
        tokenizer: the text encoder's tokenizer (a name or folder; MusicGen's is T5's).
        clip_seconds: clip length; files shorter than one clip are skipped with a warning.
        val_fraction: the share of files held out for validation (at least one when there are two or more).
        max_clips_per_file: keep at most this many clips of each file (``None``: all).
        max_text_length: captions are cut to this many tokens.
        cache_dir: where the codes are cached (``None``: ``<data_dir>/.codes_cache``).
        batch_size: clips per batch.
        seed: fixes the split and the training order.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        data_dir: str,
        tokenizer: str = "facebook/musicgen-medium",
        clip_seconds: float = 30.0,
        val_fraction: float = 0.1,
        max_clips_per_file: int | None = None,
        max_text_length: int = 64,
        cache_dir: str | None = None,
        batch_size: int = 4,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if clip_seconds <= 0:
            raise ValueError(f"clip_seconds={clip_seconds} must be > 0 (the paper uses 30).")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1).")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else self.data_dir / ".codes_cache"
        self.tokenizer: Any = None
        self.splits: dict[str, list[str]] = {}
        self.codes: dict[str, torch.Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from transformers import AutoTokenizer

        if not self.data_dir.is_dir():
            raise ValueError(f"data_dir={str(self.data_dir)!r} is not a folder; give the folder of audio files.")
        captions = read_captions(self.data_dir)
        files = sorted(
            p.relative_to(self.data_dir).as_posix()
            for p in self.data_dir.rglob("*")
            if p.suffix.lower() in AUDIO_SUFFIXES and self.cache_dir not in p.parents
        )
        if not files:
            raise ValueError(f"{self.data_dir} holds no audio file ({', '.join(AUDIO_SUFFIXES)}).")
        missing = [f for f in files if f not in captions]
        if missing:
            raise ValueError(
                f"the caption file in {self.data_dir} has no entry for {len(missing)} audio file(s): {missing[:5]}; "
                "add a line per file (file,caption), or move those files out of the folder."
            )
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(self.hparams.seed)).tolist()
        held = 0 if len(files) < 2 else max(1, round(self.hparams.val_fraction * len(files)))
        self.splits = {
            "val": sorted(files[i] for i in order[:held]),
            "train": sorted(files[i] for i in order[held:]),
        }
        self.captions = captions
        self.tokenizer = AutoTokenizer.from_pretrained(self.hparams.tokenizer)

    def attach_codec(
        self, encode: Callable[[torch.Tensor], torch.Tensor], sampling_rate: int, num_codebooks: int, codec_key: str
    ) -> None:
        """Encode every clip with ``encode`` (``(B, 1, N)`` waveforms -> ``(B, K, T)`` codes), or read the cache.

        Args:
            encode: the codec's encoder.
            sampling_rate: the codec's rate; files are resampled to it.
            num_codebooks: ``K``, which the codes must have (the decoder's codebooks).
            codec_key: identifies the codec's weights in the cache key (a name and a checksum).
        """
        self.setup()
        samples = round(self.hparams.clip_seconds * sampling_rate)
        skipped = []
        for split in ("train", "val"):
            for file in self.splits[split]:
                if file in self.codes:
                    continue
                codes = self._encode_file(file, encode, sampling_rate, samples, codec_key)
                if codes is None:
                    skipped.append(file)
                    continue
                if codes.shape[1] != num_codebooks:
                    raise ValueError(
                        f"the codec gives {codes.shape[1]} codebooks but the decoder reads {num_codebooks}; use the "
                        "codec the model was trained with (its target bandwidth sets the number of codebooks)."
                    )
                self.codes[file] = codes
        for split in self.splits:
            self.splits[split] = [f for f in self.splits[split] if f not in skipped]
        if not self.splits["train"]:
            raise ValueError(
                f"no training clip of {self.hparams.clip_seconds} s is left in {self.data_dir}: every training file is "
                "shorter; lower clip_seconds or add longer recordings."
            )

    def _encode_file(
        self, file: str, encode: Callable, sampling_rate: int, samples: int, codec_key: str
    ) -> torch.Tensor | None:
        path = self.data_dir / file
        stat = path.stat()
        key = f"{codec_key}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{samples}|{sampling_rate}"
        key += f"|{self.hparams.max_clips_per_file}"
        name = hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors"
        if (self.cache_dir / name).is_file():
            return load_file(self.cache_dir / name)["codes"].long()
        audio = load_audio(path, sampling_rate)
        count = len(audio) // samples
        if count == 0:
            warnings.warn(
                f"{path} lasts {len(audio) / sampling_rate:.2f} s, shorter than clip_seconds="
                f"{self.hparams.clip_seconds}: skipped. Lower clip_seconds to use it.",
                stacklevel=3,
            )
            return None
        count = min(count, self.hparams.max_clips_per_file or count)
        clips = torch.from_numpy(audio[: count * samples].reshape(count, 1, samples).copy())
        with torch.no_grad():
            codes = torch.cat([encode(clips[i : i + 8]) for i in range(0, count, 8)])
        atomic_write({name: {"codes": codes.to(torch.int32).contiguous()}}, self.cache_dir)
        return codes.long()

    def _dataset(self, split: str) -> list[tuple[str, torch.Tensor]]:
        if not self.codes:
            raise ValueError(
                "MusicCaptionsDataModule has no codes yet: its clips are encoded by the model's codec, which "
                "MusicGenTask attaches in its setup (or call attach_codec yourself)."
            )
        return [(self.captions[f], clip) for f in self.splits[split] for clip in self.codes[f]]

    def collate(self, items: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        text = self.tokenizer(
            [caption for caption, _ in items],
            padding=True,
            truncation=True,
            max_length=self.hparams.max_text_length,
            return_tensors="pt",
        )
        return {
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "codes": torch.stack([c for _, c in items]),
        }

    def train_dataloader(self) -> DataLoader:
        data = self._dataset("train")
        sampler = EpochSeededSampler(len(data), self.hparams.seed)
        return DataLoader(
            data,
            self.hparams.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        data = self._dataset("val" if self.splits.get("val") else "train")
        return DataLoader(data, self.hparams.batch_size, collate_fn=self.collate, num_workers=self.hparams.num_workers)


__all__ = ["MusicCaptionsDataModule", "load_audio", "read_captions", "wav_bytes"]
