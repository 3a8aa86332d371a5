"""Symbolic music data: scores tokenised once (cached), split by piece, cut into windows at bar lines, batched.

:class:`SymbolicMusicDataModule` reads the music21 corpus collections (``"corpus:bach"``, ...;
:data:`~modalpeft.audio.symbolic.CORPUS_COLLECTIONS`) and folders of scores, tokenises every part of every score with
:class:`~modalpeft.audio.symbolic.MelodyTokenizer`, and caches the tokens per source in ``cache_dir`` (JSON keyed by
the source, its files' sizes and modification times, music21's version and the encoding's version). Pieces (not
parts: the voices of one chorale are alike) are split into training and validation by a seeded permutation.

A line longer than ``block_size`` is cut into windows at ``BAR`` tokens (:func:`windows`); a window after the first
starts with the line's time-signature token, given as context (no loss on it). Batches are dicts: ``input_ids``
``(B, T)`` (the model's start token, then the window but its last token; right padding with the start token) and
``labels`` ``(B, T)`` (the window; ``-100`` where no loss is taken). ``transpose=k`` moves each training window by
a random number of semitones in ``[-k, k]`` (seeded by the epoch).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..core.state import atomic_write
from ..lightning.data import EpochSeededSampler
from .symbolic import ENCODING_VERSION, PITCH_RANGE, MelodyTokenizer, corpus_sources, folder_sources, tokenize_sources

IGNORE = -100


def source_pieces(
    source: str, cache_dir: str | os.PathLike[str] | None = None, limit: int | None = None
) -> list[list[list[int]]]:
    """The token lines of every piece of one source (``"corpus:<collection>"`` or a folder; its first ``limit``
    scores when given), from the cache when it holds them (pieces music21 cannot parse are skipped with a warning; see
    :func:`~modalpeft.audio.symbolic.tokenize_sources`)."""
    import music21

    scores = corpus_sources(source.split(":", 1)[1]) if source.startswith("corpus:") else folder_sources(source)
    scores = scores[:limit] if limit is not None else scores
    digest = hashlib.sha256(f"{source}|{music21.__version__}|{ENCODING_VERSION}".encode())
    for s in scores:
        if isinstance(s, tuple):
            digest.update(s[1].encode())
        else:
            stat = Path(s).stat()
            digest.update(f"{s}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    name = f"{digest.hexdigest()[:20]}.json"
    cached = Path(cache_dir).expanduser() / name if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text())["pieces"]
    tokenizer = MelodyTokenizer()
    pieces = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for score in scores:
            try:
                lines = tokenize_sources([score], tokenizer)
            except ValueError:
                continue
            pieces.append(lines)
    skipped = len(scores) - len(pieces)
    if not pieces:
        raise ValueError(f"{source}: music21 could parse none of its {len(scores)} scores.")
    if skipped:
        warnings.warn(f"{source}: skipped {skipped} of {len(scores)} scores music21 cannot parse", stacklevel=2)
    del caught
    if cached is not None:
        atomic_write({name: {"source": source, "pieces": pieces}}, cached.parent)
    return pieces


def windows(line: Sequence[int], block_size: int, tokenizer: MelodyTokenizer) -> list[tuple[list[int], int]]:
    """``(tokens, context)`` windows of at most ``block_size`` tokens covering ``line`` once: each cut is at a ``BAR``
    token (or hard, when a measure alone is longer); ``context`` leading tokens carry no loss (the time signature a
    later window repeats)."""
    if block_size < 4:
        raise ValueError(f"block_size={block_size} is too small; use at least 4 (the demo uses 256).")
    meter = line[0] if line and line[0] in tokenizer.meter_ids else None
    out, start = [], 0
    while start < len(line):
        prefix = [] if start == 0 or meter is None else [meter]
        stop = min(len(line), start + block_size - len(prefix))
        if stop < len(line):
            bars = [i for i in range(start + 1, stop) if line[i] == tokenizer.bar]
            stop = bars[-1] if bars else stop
        out.append((prefix + list(line[start:stop]), len(prefix)))
        start = stop
    return out


def collate(items: Sequence[tuple[list[int], int]], start_token: int) -> dict[str, Tensor]:
    """Batch ``(tokens, context)`` windows: ``input_ids`` = start token + tokens[:-1], ``labels`` = tokens."""
    length = max(len(t) for t, _ in items)
    ids = torch.full((len(items), length), start_token, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    for i, (tokens, context) in enumerate(items):
        seq = torch.tensor(tokens, dtype=torch.long)
        ids[i, 1 : len(seq)] = seq[:-1]
        labels[i, context : len(seq)] = seq[context:]
    return {"input_ids": ids, "labels": labels}


def transpose_window(tokens: list[int], shift: int, tokenizer: MelodyTokenizer) -> list[int]:
    """``tokens`` moved by ``shift`` semitones (pitches leaving the range move back by an octave)."""
    lo, hi = PITCH_RANGE
    first = tokenizer.pitch_ids.start
    out = []
    for t in tokens:
        if t in tokenizer.pitch_ids:
            t = tokenizer.pitch_token(t - first + lo + shift) if lo <= t - first + lo + shift <= hi else t
        out.append(t)
    return out


class _TransposingSampler(EpochSeededSampler):
    """Tells the dataset the epoch, so that its transpositions change with it."""

    def __init__(self, data: _Windows, seed: int) -> None:
        super().__init__(len(data), seed)
        self.data = data

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.data.epoch = epoch


class _Windows(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[list[int], int]], tokenizer: MelodyTokenizer, transpose: int, seed: int):
        self.items, self.tokenizer, self.transpose, self.seed, self.epoch = items, tokenizer, transpose, seed, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        tokens, context = self.items[i]
        if self.transpose:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 100_003 + i)
            shift = int(torch.randint(-self.transpose, self.transpose + 1, (1,), generator=g))
            tokens = transpose_window(tokens, shift, self.tokenizer)
        return tokens, context


class SymbolicMusicDataModule(pl.LightningDataModule):
    """Tokenised scores as LM windows (see the module docstring).

    Args:
        sources: ``"corpus:<collection>"`` names (:data:`~modalpeft.audio.symbolic.CORPUS_COLLECTIONS`) or folders
            of scores, pooled.
        val_fraction: the share of pieces held out (seeded).
        block_size: the longest window, in tokens (the model sees one more: its start token).
        batch_size: windows per batch.
        transpose: random transposition of training windows, in semitones (0: none).
        cache_dir: where tokenised sources are cached (``None``: no cache).
        seed: the split and the transpositions.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        sources: list[str],
        val_fraction: float = 0.1,
        block_size: int = 256,
        batch_size: int = 16,
        transpose: int = 0,
        cache_dir: str | None = "~/.cache/modalpeft/symbolic",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("sources is empty; give corpus names such as 'corpus:bach' or folders of scores.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1).")
        self.save_hyperparameters()
        self.tokenizer = MelodyTokenizer()
        self.start_token = len(self.tokenizer)  # the model's start/pad id (MusicGen: the vocabulary size)
        self.train_items: list[tuple[list[int], int]] = []
        self.val_items: list[tuple[list[int], int]] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_items:
            return
        hp = self.hparams
        pieces = [p for s in hp.sources for p in source_pieces(s, hp.cache_dir)]
        order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(hp.seed)).tolist()
        n_val = round(hp.val_fraction * len(pieces))
        for rank, index in enumerate(order):
            items = [w for line in pieces[index] for w in windows(line, hp.block_size, self.tokenizer)]
            (self.val_items if rank < n_val else self.train_items).extend(items)

    def train_dataloader(self) -> DataLoader:
        data = _Windows(self.train_items, self.tokenizer, self.hparams.transpose, self.hparams.seed)
        return self._loader(data, sampler=_TransposingSampler(data, self.hparams.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader(_Windows(self.val_items, self.tokenizer, 0, 0))

    def _loader(self, data: Any, sampler: Any = None) -> DataLoader:
        return DataLoader(
            data,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=partial(collate, start_token=self.start_token),
            num_workers=self.hparams.num_workers,
        )


__all__ = ["IGNORE", "SymbolicMusicDataModule", "collate", "source_pieces", "transpose_window", "windows"]
