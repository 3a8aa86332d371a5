"""Render benchmark records (from :func:`benchmarks.harness.measure` or its JSON files) as a Markdown table and
a parameters-vs-metric plot.

    python -m benchmarks.report benchmarks/results/*.json   # prints the tables, writes a .png beside each JSON
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COLUMNS = (
    "method", "trainable", "%", "file", "act. saved", "x floor", "train mem", "x full mem", "peak RSS", "step time",
    "x full", "x lora", "merged infer", "metric",
)  # fmt: skip


def load_records(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(run_info, records)`` from a JSON file written by :func:`benchmarks.harness.write_json` (a bare list
    of records is accepted too, with empty run info)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return {}, data
    return data.get("run", {}), data["records"]


def markdown_table(records: Sequence[Mapping[str, Any]], run_info: Mapping[str, Any] | None = None) -> str:
    """A Markdown table, one row per record, followed by notes on what the columns mean."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c == "method" else "---:" for c in COLUMNS) + "|",
    ]
    for r in records:
        if r.get("error"):
            cells = [r["method"], f"failed: {r['error']}"] + [""] * (len(COLUMNS) - 2)
        else:
            infer = f"{_time(r.get('merged_infer_time'))} ({r.get('infer_mode', 'merged' if r.get('merged') else '')})"
            cells = [
                r["method"],
                _count(r.get("trainable_params")),
                _percent(r.get("trainable_percent")),
                _bytes(r.get("file_size")),
                _bytes(r.get("saved_bytes")),
                _times(r.get("saved_bytes_vs_floor")),
                _bytes(r.get("train_bytes")),
                _times(r.get("train_bytes_vs_full")),
                _bytes(r.get("peak_memory")),
                _time(r.get("step_time")),
                _times(r.get("step_time_vs_full")),
                _times(r.get("step_time_vs_lora")),
                infer,
                "n/a" if r.get("metric") is None else f"{r['metric']:.4g}",
            ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join([*_header(records, run_info or {}), "", *lines, "", *_notes(records)]) + "\n"


def plot_params_vs_metric(
    records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, metric_name: str = "metric"
) -> Path | None:
    """Scatter trainable parameters (log x) against ``metric``, one labelled point per record with a metric.

    Returns the written path, or ``None`` (and writes nothing) when no record has a metric.
    """
    points = [
        (r["method"], r["trainable_params"], r["metric"])
        for r in records
        if r.get("metric") is not None and r.get("trainable_params")
    ]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, params, metric in points:
        ax.scatter(params, metric)
        ax.annotate(name, (params, metric), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric_name)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def render(
    records: Sequence[Mapping[str, Any]],
    stem: str | os.PathLike[str],
    run_info: Mapping[str, Any] | None = None,
    appendix: str = "",
) -> tuple[str, Path | None]:
    """Write ``<stem>.md`` (the table, then ``appendix``: Markdown a run adds) and ``<stem>.png`` (the plot, when
    there are metrics).

    Returns the Markdown and the plot's path (``None`` when no record has a metric; the table says so).
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_params_vs_metric(records, stem.with_suffix(".png"))
    table = markdown_table(records, run_info)
    if plot is None:
        table += "\nNo parameters-vs-metric plot: no record has a metric.\n"
    if appendix:
        table += "\n" + appendix
    stem.with_suffix(".md").write_text(table)
    return table, plot


BEFORE = Path(__file__).resolve().parent / "results" / "before_issue13.json"
"""The cost ratios before issue 13's work, per committed run name (``<model>_b<batch>_<device>``), with the commits
they were read from."""


def before_after(records: Sequence[Mapping[str, Any]], run_name: str, before_path: Path = BEFORE) -> str:
    """Markdown: each method's activation bytes (x floor), peak RSS (x full) and step time (x the run's time
    reference) before issue 13's cost work and in ``records``; empty when ``before_path`` has no entry for
    ``run_name`` (another model, batch or device than the committed runs)."""
    if not before_path.is_file():
        return ""
    entry = json.loads(before_path.read_text()).get(run_name)
    if entry is None:
        return ""
    ref, old, sources = entry["time_reference"], entry["methods"], entry["sources"]
    now = {r["method"]: r for r in records if not r.get("error")}
    step_key = f"step_time_vs_{ref}"
    lines = [
        "## Before and after the cost work (issue 13)",
        "",
        f"Before: peak RSS and step time from the run the issue was filed on (commit {sources['rss_and_time']}), "
        f"activation bytes from the first run that measured them (commit {sources['saved']}); "
        "`benchmarks/results/before_issue13.json`. After: this run. The RSS columns differ in method too: before, "
        "the default heap over every step; now, the memory alive at once (`exact_heap`, see the notes above).",
        "",
        f"| method | act. x floor, before | after | peak RSS x full, before | after | step x {ref}, before | after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in [*old, *(m for m in now if m not in old)]:
        b, a = old.get(name, {}), now.get(name, {})
        cells = [
            (b.get("saved_bytes_vs_floor"), a.get("saved_bytes_vs_floor")),
            (b.get("peak_memory_vs_full"), a.get("peak_memory_vs_full")),
            (b.get(step_key), a.get(step_key)),
        ]
        lines.append(f"| {name} | " + " | ".join(f"{_times(x)} | {_times(y)}" for x, y in cells) + " |")
    return "\n".join(lines) + "\n"


# -- formatting ---------------------------------------------------------------------------------------------
def _header(records: Sequence[Mapping[str, Any]], run_info: Mapping[str, Any]) -> list[str]:
    first = next((r for r in records if not r.get("error")), records[0] if records else {})
    facts = {
        "model": run_info.get("model"),
        "batch": run_info.get("batch"),
        "device": first.get("device_name") and f"{first.get('device')} ({first.get('device_name')})",
        "torch": first.get("torch_version"),
        "threads": first.get("threads"),
        "steps": first.get("steps") and f"{first.get('steps')} timed after {first.get('warmup')} warm-up",
        "isolated": first.get("isolated"),
        "load avg": _load_range(records),
    }
    return ["; ".join(f"{k}: {v}" for k, v in facts.items() if v is not None)]


def _notes(records: Sequence[Mapping[str, Any]]) -> list[str]:
    kinds = sorted({r["peak_memory_kind"] for r in records if r.get("peak_memory_kind")})
    notes = [
        "- x full / x lora: median training-step time (forward, backward, AdamW) relative to full fine-tuning / "
        "peft LoRA, measured in this run.",
        "- act. saved: bytes autograd saves for backward in one step (each storage once, parameters and buffers "
        "excluded; deterministic); x floor: relative to the frozen model with backward through every block and "
        "nothing trained inside it (the candidate 'floor').",
        "- train mem: act. saved + trainable parameters, their gradients and AdamW's state; x full mem: relative to "
        "full fine-tuning's.",
        "- peak RSS: growth over the built model's resting footprint during the untimed warm-up steps "
        f"({', '.join(kinds) or '-'}; with a 1 MiB mmap threshold, from the model's build on, freed tensors leave the "
        "process at once, so the peak is the most memory alive at once: benchmarks/harness.py).",
        "- merged infer: median forward time after merge_and_unload (merged), of the adapted model when the "
        "method cannot merge (unmerged), or of the plain model (plain).",
    ]
    if all(r.get("metric") is None for r in records):
        notes.append("- metric: n/a; this run measures cost only (no evaluation was given).")
    return notes


def _load_range(records: Sequence[Mapping[str, Any]]) -> str | None:
    loads = [r["load_avg"] for r in records if r.get("load_avg") is not None]
    return f"{min(loads):.1f}-{max(loads):.1f} (1-min, at each candidate's start)" if loads else None


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = n / size  # below 1024: three significant digits, never an exponent
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"
    return f"{n} B"


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _percent(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}%"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render benchmark JSON files as Markdown tables and plots.")
    parser.add_argument("files", nargs="+", type=Path, help="JSON files written by benchmarks.run / measure()")
    args = parser.parse_args(argv)
    for path in args.files:
        run_info, records = load_records(path)
        table, _ = render(records, path.with_suffix(""), run_info)
        print(f"## {path}\n\n{table}")


if __name__ == "__main__":
    main()
