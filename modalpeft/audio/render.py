"""Decoded melodies to MIDI files, to audio with a General MIDI soundfont, and to piano-roll pictures.

Audio rendering uses tinysoundfont (PyPI, install with ``--no-deps``) and a soundfont file: Debian's
``musescore-general-soundfont-small`` installs ``/usr/share/sounds/sf3/MuseScore_General_Lite.sf3``
(:func:`find_soundfont` looks there and in the usual places). MIDI files are written directly (a one-track standard
MIDI file), so they need nothing but the events.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import wav_bytes
from .symbolic import Event

SOUNDFONT_PLACES: tuple[str, ...] = (
    "/usr/share/sounds/sf3/default-GM.sf3",
    "/usr/share/sounds/sf3/MuseScore_General_Lite.sf3",
    "/usr/share/sounds/sf3/MuseScore_General.sf3",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/soundfonts/default.sf2",
)
"""Where :func:`find_soundfont` looks (after ``$MODALPEFT_SOUNDFONT``)."""

PPQ = 480
"""MIDI ticks per quarter note."""


def find_soundfont(path: str | os.PathLike[str] | None = None) -> Path | None:
    """``path`` when given and present, else ``$MODALPEFT_SOUNDFONT``, else the first of :data:`SOUNDFONT_PLACES`
    that exists; ``None`` when there is none."""
    candidates = [path] if path not in (None, "default") else [os.environ.get("MODALPEFT_SOUNDFONT"), *SOUNDFONT_PLACES]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def soundfont_missing_reason() -> str | None:
    """Why audio cannot be rendered here (``None``: it can)."""
    try:
        import tinysoundfont  # noqa: F401
    except ImportError:
        return "tinysoundfont is not installed (pip install --no-deps tinysoundfont; make setup does)"
    if find_soundfont() is None:
        return (
            "no General MIDI soundfont found (apt-get install musescore-general-soundfont-small, or set "
            "$MODALPEFT_SOUNDFONT)"
        )
    return None


def _notes(events: Sequence[Event], tempo: float) -> list[tuple[float, float, int]]:
    """``(start s, end s, pitch)`` of the notes (rests dropped)."""
    scale = 60.0 / tempo
    return [(e.onset * scale, (e.onset + e.duration) * scale, e.pitch) for e in events if e.pitch is not None]


def _varlen(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def write_midi(events: Sequence[Event], tempo: float = 120.0, program: int = 0, velocity: int = 80) -> bytes:
    """A format-0 standard MIDI file's bytes: the notes of ``events`` on channel 0 with GM ``program``."""
    messages: list[tuple[int, int, bytes]] = []  # (tick, order: offs before ons, message)
    for e in events:
        if e.pitch is None:
            continue
        start, stop = round(e.onset * PPQ), round((e.onset + e.duration) * PPQ)
        messages += [(start, 1, bytes([0x90, e.pitch, velocity])), (stop, 0, bytes([0x80, e.pitch, 0]))]
    micros = round(60_000_000 / tempo)
    track = b"\x00\xff\x51\x03" + micros.to_bytes(3, "big") + b"\x00" + bytes([0xC0, program])
    now = 0
    for tick, _, message in sorted(messages):
        track += _varlen(tick - now) + message
        now = tick
    track += b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, PPQ) + b"MTrk" + struct.pack(">I", len(track)) + track


def render_audio(
    events: Sequence[Event],
    tempo: float = 120.0,
    soundfont: str | os.PathLike[str] | None = None,
    program: int = 0,
    sample_rate: int = 16000,
    seconds: float | None = None,
    velocity: int = 80,
) -> np.ndarray:
    """Mono float32 audio of ``events`` played by GM ``program`` of the soundfont, cut to ``seconds`` (else the
    music's length plus a one-second release), peak-normalised to 0.9.

    Raises:
        ValueError: tinysoundfont or the soundfont is missing (the fix named).
    """
    reason = soundfont_missing_reason() if soundfont in (None, "default") else None
    path = find_soundfont(soundfont)
    if reason or path is None:
        raise ValueError(f"cannot render audio: {reason or f'soundfont {soundfont} not found'}.")
    import tinysoundfont

    synth = tinysoundfont.Synth(samplerate=sample_rate)
    sfid = synth.sfload(str(path))
    synth.program_select(0, sfid, 0, program)
    notes = _notes(events, tempo)
    end = seconds if seconds is not None else (max((n[1] for n in notes), default=0.0) + 1.0)
    changes = sorted([(s, 1, p) for s, _, p in notes] + [(t, 0, p) for _, t, p in notes])  # offs first at a tie
    chunks, done = [], 0
    for time, on, pitch in changes:
        frame = min(round(time * sample_rate), round(end * sample_rate))
        if frame > done:
            chunks.append(np.frombuffer(synth.generate(frame - done), dtype=np.float32).copy())
            done = frame
        if time < end:
            synth.noteon(0, pitch, velocity) if on else synth.noteoff(0, pitch)
    total = round(end * sample_rate)
    if total > done:
        chunks.append(np.frombuffer(synth.generate(total - done), dtype=np.float32).copy())
    stereo = np.concatenate(chunks).reshape(-1, 2) if chunks else np.zeros((0, 2), np.float32)
    audio = stereo.mean(axis=1)
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    return (audio * (0.9 / peak) if peak > 0 else audio).astype(np.float32)


def render_events(events: Sequence[Event], tempo: float = 120.0, **kwargs: Any) -> bytes:
    """:func:`render_audio` as a 16-bit WAV file's bytes."""
    rate = kwargs.get("sample_rate", 16000)
    return wav_bytes(render_audio(events, tempo, **kwargs), rate)


def piano_roll(
    rolls: Sequence[tuple[str, Sequence[Event]]], path: str | os.PathLike[str], quarters: float | None = None
) -> None:
    """One piano-roll panel per ``(title, events)`` (pitch over time in quarter notes, bar lines dotted), saved as a
    PNG (atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.state import atomic_write

    fig, axes = plt.subplots(len(rolls), 1, figsize=(10, 1.5 * len(rolls) + 0.4), squeeze=False, sharex=True)
    for ax, (title, events) in zip(axes[:, 0], rolls, strict=True):
        notes = [e for e in events if e.pitch is not None and (quarters is None or e.onset < quarters)]
        ax.broken_barh([(e.onset, e.duration) for e in notes], (0, 1), alpha=0)  # sets the x range when empty
        for e in notes:
            ax.add_patch(plt.Rectangle((e.onset, e.pitch - 0.4), e.duration * 0.95, 0.8, color="tab:blue"))
        starts = sorted({e.onset - e.position for e in events if quarters is None or e.onset < quarters})
        for x in starts:
            ax.axvline(x, color="0.75", lw=0.6, ls=":")
        pitches = [e.pitch for e in notes] or [60]
        ax.set_ylim(min(pitches) - 2, max(pitches) + 2)
        ax.set_xlim(0, quarters if quarters is not None else max((e.onset + e.duration for e in events), default=1))
        ax.set_ylabel("MIDI pitch", fontsize=7)
        ax.set_title(title, fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("time (quarter notes)", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write({Path(path).name: buffer.getvalue()}, Path(path).parent)


__all__ = [
    "SOUNDFONT_PLACES",
    "find_soundfont",
    "piano_roll",
    "render_audio",
    "render_events",
    "soundfont_missing_reason",
    "write_midi",
]
