"""Symbolic music as tokens: a documented melody event encoding, score reading with music21, and the music21 corpus.

The encoding (:class:`MelodyTokenizer`) turns one line of music (a part of a score; chords and simultaneous voices are
reduced to their highest note, the *skyline*) into events, and each event into tokens:

- the piece starts with its time signature, ``TS_<n>/<d>`` (:data:`TIME_SIGNATURES`; ``TS_other`` for the rest);
- ``BAR`` marks the start of every measure (before the first event that starts in it; a measure in which nothing
  starts, under a long tied note, is a ``BAR`` followed by the next measure's ``BAR``);
- a note is ``P<midi>`` (MIDI pitch 36-96: C2-C7; pitches outside move by octaves into the range) followed by
  ``D<quarters>``, its duration in quarter notes rounded (on a log scale) to the nearest of :data:`DURATIONS`;
  a rest is ``REST`` followed by its ``D`` token; tied notes are merged first, grace notes dropped, and a note
  lasts until the next onset when it overlaps it;
- ``EOS`` ends the piece.

The start token is the model's own (MusicGen's ``bos_token_id`` = the vocabulary size), not part of this vocabulary.
Decoding (:meth:`MelodyTokenizer.decode`) reads the events back (onset, duration, pitch) and skips tokens that break
the grammar (a duration without a note, a note without a duration), counting them.

Scores are read by music21 (MusicXML, MIDI, ABC, Humdrum kern, ...): :func:`read_score` names the file it cannot
parse; :func:`tokenize_sources` skips those with a count and a warning, and fails when nothing is left. Multi-tune
ABC files (the Essen and O'Neill's collections) are split into tunes with their ``R:`` (rhythm) field, so that one
genre can be selected (:func:`abc_tunes`). :func:`corpus_sources` names the music21 corpus collections this project
uses.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

TIME_SIGNATURES: tuple[str, ...] = ("2/4", "3/4", "4/4", "6/8", "9/8", "12/8", "2/2", "3/2", "4/2", "other")
"""Time signatures with their own token; others share ``TS_other``."""

DURATIONS: tuple[Fraction, ...] = tuple(
    Fraction(x) for x in ("1/6", "1/4", "1/3", "1/2", "2/3", "3/4", "1", "3/2", "2", "3", "4", "6", "8")
)
"""Durations in quarter notes (a sixteenth to a breve, with triplet eighths and quarters and dotted values)."""

PITCH_RANGE: tuple[int, int] = (36, 96)
"""The lowest and highest MIDI pitch with a token (C2 and C7)."""

ENCODING_VERSION = 1
"""Bumped when the encoding changes (cached token files are keyed by it)."""


@dataclass(frozen=True)
class Event:
    """One decoded event: ``pitch`` is a MIDI number, ``None`` for a rest; times in quarter notes."""

    onset: float
    duration: float
    pitch: int | None
    bar: int
    """The index of the measure the event starts in (0 before the first ``BAR``)."""
    position: float
    """The onset within its measure (quarter notes since the last ``BAR``)."""


class MelodyTokenizer:
    """The melody event vocabulary (see the module docstring): ``EOS``, ``BAR``, ``REST``, the time signatures, the
    pitches and the durations, in that order."""

    def __init__(self) -> None:
        lo, hi = PITCH_RANGE
        self.tokens: list[str] = ["EOS", "BAR", "REST"]
        self.tokens += [f"TS_{ts}" for ts in TIME_SIGNATURES]
        self.tokens += [f"P{p}" for p in range(lo, hi + 1)]
        self.tokens += [f"D{d}" for d in DURATIONS]
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.eos, self.bar, self.rest = self.ids["EOS"], self.ids["BAR"], self.ids["REST"]
        self.pitch_ids = range(self.ids[f"P{lo}"], self.ids[f"P{hi}"] + 1)
        self.duration_ids = range(self.ids[f"D{DURATIONS[0]}"], self.ids[f"D{DURATIONS[-1]}"] + 1)
        self.meter_ids = range(self.ids[f"TS_{TIME_SIGNATURES[0]}"], self.ids["TS_other"] + 1)
        self._log_durations = [math.log(float(d)) for d in DURATIONS]

    def __len__(self) -> int:
        return len(self.tokens)

    # -- encoding --------------------------------------------------------------------------------------------
    def meter_token(self, ratio: str | None) -> int:
        return self.ids[f"TS_{ratio}"] if ratio in TIME_SIGNATURES else self.ids["TS_other"]

    def duration_token(self, quarters: float) -> int:
        """The ``D`` token nearest to ``quarters`` on a log scale (longer than the longest: the longest)."""
        x = math.log(max(float(quarters), 1e-6))
        best = min(range(len(DURATIONS)), key=lambda i: abs(self._log_durations[i] - x))
        return self.duration_ids[best]

    def pitch_token(self, midi: int) -> int:
        lo, hi = PITCH_RANGE
        while midi < lo:
            midi += 12
        while midi > hi:
            midi -= 12
        return self.pitch_ids[midi - lo]

    def encode_line(
        self, notes: Sequence[tuple[float, float, int]], bars: Sequence[float], meter: str | None
    ) -> list[int]:
        """Tokens of one line: ``notes`` are ``(onset, duration, midi)`` in quarter notes (any order, overlaps
        allowed: the skyline is kept), ``bars`` the onsets of its measures, ``meter`` its time signature."""
        top: dict[float, tuple[float, int]] = {}
        for onset, duration, pitch in notes:
            if duration <= 0:
                continue  # grace notes
            if onset not in top or pitch > top[onset][1]:
                top[onset] = (duration, pitch)
        onsets = sorted(top)
        out = [self.meter_token(meter)]
        starts = sorted(bars) or [0.0]
        cursor = onsets[0] if onsets else 0.0
        b = max(self._bar_index(starts, 0, cursor) - 1, 0)  # leading empty measures are dropped
        for i, onset in enumerate(onsets):
            duration, pitch = top[onset]
            following = onsets[i + 1] if i + 1 < len(onsets) else math.inf
            if onset > cursor + 1e-6:  # a gap: a rest from the previous note's end
                out += self._bars(starts, b, cursor)
                b = self._bar_index(starts, b, cursor)
                out += [self.rest, self.duration_token(onset - cursor)]
            out += self._bars(starts, b, onset)
            b = self._bar_index(starts, b, onset)
            duration = min(duration, following - onset)
            out += [self.pitch_token(pitch), self.duration_token(duration)]
            cursor = onset + duration
        out.append(self.eos)
        return out

    @staticmethod
    def _bar_index(starts: Sequence[float], b: int, time: float) -> int:
        while b < len(starts) and starts[b] <= time + 1e-6:
            b += 1
        return b

    def _bars(self, starts: Sequence[float], b: int, time: float) -> list[int]:
        return [self.bar] * (self._bar_index(starts, b, time) - b)

    # -- decoding --------------------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int]) -> tuple[list[Event], str | None, int]:
        """``(events, meter, skipped)`` of a token sequence, up to its first ``EOS``; tokens that break the grammar
        are skipped and counted (a start token, a meter after the start, a lone pitch or duration)."""
        events: list[Event] = []
        meter, skipped, time, bar, bar_start = None, 0, 0.0, 0, 0.0
        pending: int | None | str = "none"  # the pitch waiting for its duration (None: a rest)
        for i, token in enumerate(int(t) for t in ids):
            if token == self.eos:
                break
            name = self.tokens[token] if 0 <= token < len(self.tokens) else None
            if name is None or name.startswith("TS_"):
                if name is not None and i == 0 and meter is None:
                    meter = name[3:]
                else:
                    skipped += 1
                continue
            if pending != "none" and not name.startswith("D"):
                skipped += 1  # a note or rest without its duration
                pending = "none"
            if name == "BAR":
                bar, bar_start = bar + 1, time
            elif name == "REST":
                pending = None
            elif name.startswith("P"):
                pending = int(name[1:])
            elif pending == "none":
                skipped += 1  # a duration without a note
            else:
                duration = float(DURATIONS[token - self.duration_ids.start])
                events.append(Event(time, duration, pending, bar, time - bar_start))  # type: ignore[arg-type]
                time += duration
                pending = "none"
        return events, meter, skipped

    def to_stream(self, ids: Iterable[int], tempo: float = 120.0) -> Any:
        """A music21 ``Stream`` of the decoded events (``.write("midi", path)`` writes a MIDI file)."""
        from music21 import meter, note, stream
        from music21 import tempo as m21tempo

        events, ratio, _ = self.decode(ids)
        part = stream.Part()
        part.insert(0, m21tempo.MetronomeMark(number=tempo))
        if ratio and ratio != "other":
            part.insert(0, meter.TimeSignature(ratio))
        for e in events:
            n = note.Rest() if e.pitch is None else note.Note(e.pitch)
            n.quarterLength = Fraction(e.duration).limit_denominator(12)
            part.insert(e.onset, n)
        return part


# -- reading scores -----------------------------------------------------------------------------------------------


def read_score(source: str | Path | tuple[str, str]) -> Any:
    """A music21 score from a file path, or from ``(name, text)`` (ABC text of one tune, named for messages).

    Raises:
        ValueError: music21 cannot parse it (the file named).
    """
    from music21 import converter

    try:
        if isinstance(source, tuple):
            return converter.parseData(source[1], format="abc")
        return converter.parse(str(source))
    except Exception as e:  # music21 raises many unrelated types for bad files
        name = source[0] if isinstance(source, tuple) else source
        raise ValueError(f"{name}: music21 cannot parse this score ({type(e).__name__}: {e}); remove it.") from e


def score_lines(score: Any) -> list[tuple[list[tuple[float, float, int]], list[float], str | None]]:
    """``(notes, bar onsets, meter)`` of every part of ``score`` that holds a note (ties merged)."""
    from music21 import chord, meter, note, stream

    parts = list(score.parts) if hasattr(score, "parts") and len(score.parts) else [score]
    lines = []
    for part in parts:
        part = part.stripTies()
        flat = part.flatten()
        notes = []
        for n in flat.notes:
            if n.duration.isGrace:
                continue
            if isinstance(n, chord.Chord):
                midi = max(p.midi for p in n.pitches)
            elif isinstance(n, note.Note):
                midi = n.pitch.midi
            else:
                continue  # unpitched percussion
            notes.append((float(n.offset), float(n.quarterLength), midi))
        if not notes:
            continue
        bars = [float(m.offset) for m in part.getElementsByClass(stream.Measure)]
        signatures = flat.getElementsByClass(meter.TimeSignature)
        lines.append((notes, bars, signatures[0].ratioString if len(signatures) else None))
    return lines


def tokenize_sources(
    sources: Sequence[str | Path | tuple[str, str]], tokenizer: MelodyTokenizer | None = None
) -> list[list[int]]:
    """The token lines (one per part) of every score in ``sources``; unparsable scores are skipped with a count.

    Raises:
        ValueError: no source could be read.
    """
    tokenizer = tokenizer or MelodyTokenizer()
    lines: list[list[int]] = []
    failed: list[str] = []
    for source in sources:
        try:
            score = read_score(source)
        except ValueError:
            failed.append(str(source[0] if isinstance(source, tuple) else source))
            continue
        lines += [tokenizer.encode_line(*line) for line in score_lines(score)]
    if failed:
        if not lines:
            raise ValueError(f"music21 could parse none of the {len(failed)} scores (first: {failed[0]}).")
        warnings.warn(
            f"skipped {len(failed)} of {len(sources)} scores music21 cannot parse (first: {failed[0]})", stacklevel=2
        )
    return lines


SCORE_SUFFIXES = (".mxl", ".musicxml", ".xml", ".mid", ".midi", ".abc", ".krn", ".md", ".mei")


def folder_sources(folder: str | Path) -> list[Path | tuple[str, str]]:
    """The scores in a folder (recursively, sorted); multi-tune ``.abc`` files are split into their tunes."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{folder}: no such folder of scores; give a folder of MusicXML, MIDI, ABC or kern files.")
    out: list[Path | tuple[str, str]] = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in SCORE_SUFFIXES):
        out += [(n, t) for n, _, t in abc_tunes(path)] if path.suffix.lower() == ".abc" else [path]
    if not out:
        raise ValueError(f"{folder}: holds no score files ({', '.join(SCORE_SUFFIXES)}).")
    return out


def abc_tunes(path: str | Path) -> list[tuple[str, str, str]]:
    """``(name, rhythm, text)`` of each tune (``X:`` header) of an ABC file; ``rhythm`` is its ``R:`` field in
    lower case ("" when absent), ``name`` is ``<file>#<X number>``."""
    text = Path(path).read_text(encoding="latin-1")
    tunes = []
    for chunk in re.split(r"\n(?=X:)", text):
        if not chunk.startswith("X:"):
            continue
        number = chunk.split("\n", 1)[0][2:].strip()
        rhythm = re.search(r"^R:\s*(.*?)\s*$", chunk, re.M)
        tunes.append((f"{Path(path).name}#{number}", rhythm.group(1).lower() if rhythm else "", chunk))
    return tunes


CORPUS_COLLECTIONS: dict[str, str] = {
    "bach": "Bach: 433 chorales, chorale harmonisations and other pieces (MusicXML)",
    "palestrina": "Palestrina: 1,318 mass movements (Humdrum kern)",
    "common-practice": "Bach, Handel, Haydn, Mozart, Beethoven, Corelli, C.P.E. Bach, Schubert, Schumann, Weber, Verdi",
    "oneills-jigs": "O'Neill's Music of Ireland (1850): the 280 tunes with R: jig or double jig (ABC)",
}
"""The music21 corpus collections :func:`corpus_sources` knows."""

_COMMON_PRACTICE = (
    "bach", "handel", "haydn", "mozart", "beethoven", "corelli", "cpebach", "schubert", "schumann_robert",
    "schumann_clara", "weber", "verdi",
)  # fmt: skip


def corpus_sources(name: str) -> list[Path | tuple[str, str]]:
    """The scores of one of :data:`CORPUS_COLLECTIONS` in the installed music21 corpus (sorted, so stable).

    Raises:
        ValueError: an unknown name, or music21 missing.
    """
    if name not in CORPUS_COLLECTIONS:
        raise ValueError(f"corpus collection {name!r} is not known; choose one of {list(CORPUS_COLLECTIONS)}.")
    try:
        from music21 import corpus
    except ImportError as e:
        raise ValueError("the music21 corpus needs music21: pip install music21 (make setup installs it)") from e
    if name == "oneills-jigs":
        root = Path(corpus.getComposer("bach")[0]).parents[1] / "oneills1850"
        tunes, titles = [], set()
        for f in sorted(root.glob("*.abc")):
            for n, r, t in abc_tunes(f):
                title = re.search(r"^T:\s*(.*?)\s*$", t, re.M)
                key = title.group(1).lower() if title else n
                if r in ("jig", "double jig") and key not in titles:  # some files transcribe a tune twice
                    tunes.append((n, t))
                    titles.add(key)
        return tunes
    composers = _COMMON_PRACTICE if name == "common-practice" else (name,)
    return sorted({Path(p) for c in composers for p in corpus.getComposer(c) if Path(p).suffix != ".py"})


__all__ = [
    "CORPUS_COLLECTIONS",
    "DURATIONS",
    "PITCH_RANGE",
    "TIME_SIGNATURES",
    "Event",
    "MelodyTokenizer",
    "abc_tunes",
    "corpus_sources",
    "folder_sources",
    "read_score",
    "score_lines",
    "tokenize_sources",
]
