"""Rewrite the cost sections of the committed results pages from the committed benchmark tables.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.pages            # vision.md, pointcloud.md, tracking*.md
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.pages --check    # exit 1 when a page is out of date

``docs/results/vision.md``, ``pointcloud.md`` and the tracking pages end with the ViT-B/16, Point-MAE and SPMTrack-B
benchmark tables (``benchmarks/results/*.md``), written there by the demos when they run. After a new benchmark run
(``python -m benchmarks.run --results-dir benchmarks/results``, ``python -m benchmarks.pointcloud --results-dir
benchmarks/results``, ``python -m benchmarks.tracking --batch 2 --results-dir benchmarks/results``) this rewrites just
that last section, with the demos' own code (each demo's ``cost_section``), so the accuracy sections above
it stay the figures of the demo run that made them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from modalpeft.core.state import atomic_write

ROOT = Path(__file__).resolve().parents[1]


def sections() -> dict[str, tuple[str, Callable[[], list[str]]]]:
    """``page name -> (heading, the section's lines)``."""
    from modalpeft.pointcloud import demo as pointcloud
    from modalpeft.tracking import demo as tracking
    from modalpeft.vision import demo as vision

    return {
        "vision.md": (vision.COST_HEADING, vision.cost_section),
        "pointcloud.md": (pointcloud.COST_HEADING, pointcloud.cost_section),
        "tracking.md": (tracking.COST_HEADING, tracking.cost_section),
        "tracking_240_steps.md": (tracking.COST_HEADING, tracking.cost_section),
    }


def rewrite(text: str, heading: str, section: list[str], ending: str = "\n") -> str:
    """``text`` with everything from the line ``heading`` to its end replaced by ``section`` (one line each, then
    ``ending``: the demos end their pages with a newline); a page without the heading gets the section appended."""
    lines = text.split("\n")
    if heading in lines:
        del lines[lines.index(heading) :]
    elif lines[-1]:
        lines.append("")
    return "\n".join([*lines, *section]) + ending


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pages", description=__doc__.split("\n")[1])
    parser.add_argument("--results-dir", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--check", action="store_true", help="only report pages whose cost section is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name, (heading, make) in sections().items():
        page = args.results_dir / name
        if not page.is_file():
            print(f"{page}: no such page (run its demo with --results-dir first)", file=sys.stderr)
            return 2
        old = page.read_text()
        new = rewrite(old, heading, make())
        if new != old:
            stale.append(name)
            if not args.check:
                atomic_write({name: new.encode()}, args.results_dir)
    verb = "out of date" if args.check else "rewrote"
    print(f"{verb}: {', '.join(stale) or 'none'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
