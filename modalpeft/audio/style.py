"""Style statistics of melodies and distances between two sets of them (generated vs held-out music of a genre).

Every statistic is pooled over a set of decoded tunes (:class:`~modalpeft.audio.symbolic.Event` lists):

*Local* (note to note):

- ``pitch_class``: the share of notes on each of the 12 pitch classes (absolute: a genre's keys are part of it);
- ``interval``: the melodic interval between consecutive notes (rests skipped), in semitones clipped to
  [-12, 12] (25 bins): steps, leaps and the turns and runs of ornaments;
- ``duration``: the share of notes of each of :data:`~modalpeft.audio.symbolic.DURATIONS`.

*Long-range* (bar and phrase):

- ``onset_position``: where in its bar each note starts, in eighth notes (0 to 15, later clipped): the metre;
- ``notes_per_bar``: how many notes start in each complete bar (0 to 15, more clipped): the bar's density;
- ``bar_repetition`` (a share, not a histogram): of the bars of a tune, the share whose content (the pitches and
  durations of its events) equals an earlier bar of the same tune: the repeats that build phrases;
- ``bar_fill`` (a share): of the bars that are followed by another bar, the share whose events add up to the bar
  length of the tune's time signature (6/8: 3 quarter notes): whether the bar structure holds.

The distance between two sets (:func:`style_distances`) is, per histogram, the Jensen-Shannon divergence in bits
(0: the same distribution, 1: disjoint ones), and per share, the absolute difference; ``local`` and
``long_range`` average their members. A set without a note gives the largest distances (1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from .symbolic import DURATIONS, Event

LOCAL: tuple[str, ...] = ("pitch_class", "interval", "duration")
LONG_RANGE: tuple[str, ...] = ("onset_position", "notes_per_bar", "bar_repetition", "bar_fill")
SHARES: tuple[str, ...] = ("bar_repetition", "bar_fill")


def _bar_length(meter: str | None) -> float | None:
    if not meter or meter == "other":
        return None
    n, d = meter.split("/")
    return 4.0 * int(n) / int(d)


def style_statistics(tunes: Sequence[tuple[Sequence[Event], str | None]]) -> dict[str, np.ndarray | float]:
    """The statistics of the module docstring over ``(events, meter)`` tunes; histograms sum to 1 (all zero when
    nothing was counted), shares are ``nan`` when nothing was counted."""
    counts = {
        "pitch_class": np.zeros(12),
        "interval": np.zeros(25),
        "duration": np.zeros(len(DURATIONS)),
        "onset_position": np.zeros(16),
        "notes_per_bar": np.zeros(16),
    }
    repeated = bars_seen = filled = bars_closed = 0
    log_durations = np.log([float(d) for d in DURATIONS])
    for events, meter in tunes:
        notes = [e for e in events if e.pitch is not None]
        for e in notes:
            counts["pitch_class"][e.pitch % 12] += 1
            counts["duration"][int(np.abs(log_durations - math.log(e.duration)).argmin())] += 1
            counts["onset_position"][min(int(round(e.position * 2)), 15)] += 1
        for a, b in zip(notes, notes[1:], strict=False):
            counts["interval"][int(np.clip(b.pitch - a.pitch, -12, 12)) + 12] += 1
        by_bar: dict[int, list[Event]] = {}
        for e in events:
            by_bar.setdefault(e.bar, []).append(e)
        last = max(by_bar, default=-1)
        length = _bar_length(meter)
        seen: set[tuple] = set()
        for bar in range(1, last + 1):  # bar 0 holds what comes before the first BAR token
            content = tuple((e.pitch, Fraction(e.duration).limit_denominator(12)) for e in by_bar.get(bar, []))
            if bar < last:  # complete bars: another bar follows
                counts["notes_per_bar"][min(sum(p is not None for p, _ in content), 15)] += 1
                if length is not None:
                    bars_closed += 1
                    filled += abs(sum(float(d) for _, d in content) - length) < 1e-6
            if content:
                bars_seen += 1
                repeated += content in seen
                seen.add(content)
    stats: dict[str, np.ndarray | float] = {}
    for name, c in counts.items():
        stats[name] = c / c.sum() if c.sum() else c
    stats["bar_repetition"] = repeated / bars_seen if bars_seen else math.nan
    stats["bar_fill"] = filled / bars_closed if bars_closed else math.nan
    return stats


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """The Jensen-Shannon divergence of two histograms, in bits (1 when either is empty)."""
    if p.sum() == 0 or q.sum() == 0:
        return 1.0
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float((a[mask] * np.log2(a[mask] / b[mask])).sum())

    return max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m))


def style_distances(
    generated: dict[str, np.ndarray | float], reference: dict[str, np.ndarray | float]
) -> dict[str, float]:
    """Per statistic, the distance of ``generated`` from ``reference`` (:func:`style_statistics` of each), and the
    ``local`` and ``long_range`` means."""
    out: dict[str, float] = {}
    for name in (*LOCAL, *LONG_RANGE):
        if name in SHARES:
            g, r = float(generated[name]), float(reference[name])
            out[name] = 1.0 if math.isnan(g) or math.isnan(r) else abs(g - r)
        else:
            out[name] = js_divergence(np.asarray(generated[name]), np.asarray(reference[name]))
    out["local"] = float(np.mean([out[n] for n in LOCAL]))
    out["long_range"] = float(np.mean([out[n] for n in LONG_RANGE]))
    return out


__all__ = ["LOCAL", "LONG_RANGE", "js_divergence", "style_distances", "style_statistics"]
