"""Dataset-side farthest-point sampling on the CPU: the torch loop against fpsample's exact ``fps_sampling``,
side by side on the same clouds in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.fps            # needs `pip install 'modalpeft[fast]'` for both

The sizes are the one-time reductions the data modules make: ModelNet40's text layout (10,000 points -> 8,192,
cached once per split) and a ScanObjectNN cloud (2,048 -> 1,024). Both paths start at the point farthest from the
centroid; the run checks they pick the same points before it reports a time. One CPU thread, the median of
``--repeats`` runs over ``--clouds`` random Gaussian clouds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from modalpeft.pointcloud import ops

SIZES = ((10_000, 8_192), (2_048, 1_024))


def seconds_per_cloud(
    fn, clouds: torch.Tensor, k: int, start: torch.Tensor, repeats: int
) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(clouds, k, start)
        times.append((time.perf_counter() - t0) / len(clouds))
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clouds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print("| points -> samples | torch loop (ms/cloud) | fpsample (ms/cloud) | torch / fpsample | same points |")
    print("|---|---:|---:|---:|---|")
    for n, k in SIZES:
        clouds = torch.from_numpy(rng.standard_normal((args.clouds, n, 3)).astype(np.float32))
        start = ops.fps_start(clouds)
        slow, reference = seconds_per_cloud(ops._fps_torch, clouds, k, start, args.repeats)
        if not ops._HAS_FPSAMPLE:
            print(f"| {n:,} -> {k:,} | {1e3 * slow:.1f} | not installed | n/a | n/a |")
            continue
        fast, picked = seconds_per_cloud(ops._fps_fpsample, clouds, k, start, args.repeats)
        same = all(set(a.tolist()) == set(b.tolist()) for a, b in zip(reference, picked, strict=True))
        print(f"| {n:,} -> {k:,} | {1e3 * slow:.1f} | {1e3 * fast:.1f} | {slow / fast:.1f}x | {same} |")


if __name__ == "__main__":
    main()
