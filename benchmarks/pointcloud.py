"""Point-cloud methods on the Point-MAE encoder (random weights), side by side with the baselines.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.pointcloud                                 # Point-MAE, batch 8
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.pointcloud --model point_mae_test --threads 1  # seconds: a check

Candidates: full fine-tuning, the head only, peft LoRA r=8 on ``qkv``, PointGST (rank 36) and Point-PEFT
(its memory bank built from the synthetic batches), all through :func:`benchmarks.harness.measure`, so the columns
are those of the ViT run (parameters, file size, peak memory, step time, the ratios to full fine-tuning, the head
and LoRA) — the cost columns of PointGST's STAG comparison. It also reports the share of a PointGST training step
spent in ``torch.linalg.eigh`` (:func:`profile_eigh_share`) and where a
Point-PEFT step goes (:func:`profile_point_peft`). Input: random
clouds ``(batch, points, 3)`` and random labels; the run measures cost, not accuracy (``make demo`` reports
accuracy on the offline mesh set).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import peft
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import modalpeft as mp
from modalpeft.pointcloud import create_backbone
from modalpeft.pointcloud.methods.point_peft import PointPEFTBlock, PointPEFTContext

from .harness import Candidate, saved_storages
from .run import add_run_arguments, measure_and_report, select

NUM_CLASSES = 15
PB_T50_RS_TRAIN = 11_416
"""Training clouds of ScanObjectNN's PB_T50_RS split: one epoch, for STAG's "time per epoch" column."""
MODELS: dict[str, dict[str, Any]] = {
    "point_mae": {"points": 1024, "pointgst": {}, "point_peft": {}},
    "point_mae_test": {
        "points": 128,
        "pointgst": {"rank": 4, "local_size": 4},
        "point_peft": {"top_k": 3, "prompt_blocks": 1, "num_anchors": 8, "num_neighbors": 4},
    },
}
"""``create_backbone`` names, the cloud size each is configured for, and the method settings (the papers' for
Point-MAE; sizes that fit the 16-group test model)."""


def build_model(name: str) -> nn.Module:
    return create_backbone(name, num_classes=NUM_CLASSES)


def synthetic_batch(batch: int, points: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, points, 3, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def candidates(model: str, batch: int) -> list[Candidate]:
    preset = MODELS[model]
    memory = [synthetic_batch(batch, preset["points"], seed) for seed in (1, 2)]
    return [
        Candidate("full", "full"),
        Candidate("head_only", "head_only"),
        Candidate("floor", "floor"),
        Candidate("lora", peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"])),
        Candidate("pointgst", mp.PointGSTConfig(**preset["pointgst"])),
        Candidate("point_peft", mp.PointPEFTConfig(memory_data=memory, **preset["point_peft"])),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="point_mae", choices=list(MODELS))
    add_run_arguments(parser)
    args = parser.parse_args(argv)

    points = MODELS[args.model]["points"]
    run_info = {"model": args.model, "batch": args.batch, "input_size": [points, 3], "metric": None}
    run_info["note"] = "random weights and synthetic clouds: a cost-only run, metric is n/a"

    def appendix(records: list[dict[str, Any]], device: str) -> str:
        """PointGST's eigh share and Point-PEFT's breakdown, profiled in this process, and the STAG columns."""
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        config = mp.PointGSTConfig(**MODELS[args.model]["pointgst"])
        model = mp.adapt(build_model(args.model), config, modules_to_save=["head"]).to(device)
        batch = tuple(t.to(device) for t in synthetic_batch(args.batch, points))
        eigh = profile_eigh_share(model, batch, steps=args.steps, warmup=args.warmup)
        torch.manual_seed(0)
        memory = [synthetic_batch(args.batch, points, seed) for seed in (1, 2)]
        config = mp.PointPEFTConfig(memory_data=memory, **MODELS[args.model]["point_peft"])
        model = mp.adapt(build_model(args.model), config, modules_to_save=["head"]).to(device)
        parts = profile_point_peft(model, batch, steps=args.steps, warmup=args.warmup)
        return stag_section(records, args.batch, eigh) + point_peft_section(records, parts)

    records = measure_and_report(
        functools.partial(build_model, args.model),
        select(candidates(args.model, args.batch), args.methods, parser),
        functools.partial(synthetic_batch, args.batch, points),
        args,
        run_info,
        appendix,
        floor_from="blocks.0",
    )
    return 1 if any(r.get("error") for r in records) else 0


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def stag_section(records: list[dict[str, Any]], batch: int, eigh: dict[str, Any]) -> str:
    """The cost columns of PointGST's STAG comparison from this run's records, and the eigh share, as Markdown.

    Time per epoch is derived: the median measured step time x the steps of one PB_T50_RS epoch at this batch
    (``ceil(11,416 / batch)``), so it scales the measured ratios, it does not add a measurement."""
    steps = -(-PB_T50_RS_TRAIN // batch)
    lines = [
        "## STAG columns (PointGST's Table: params, time per epoch, memory)",
        "",
        f"Time per epoch = median step time x {steps:,} steps (PB_T50_RS's {PB_T50_RS_TRAIN:,} training clouds at "
        f"batch {batch}); accuracy is not measured here (random weights): see `docs/results/pointcloud.md`.",
        "",
        "| method | trainable | time per epoch | x full | peak mem | x full |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r.get("error"):
            continue
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['step_time'] * steps / 60:.1f} min | "
            f"{_ratio(r.get('step_time_vs_full'))} | {r['peak_memory'] / 2**20:.0f} MiB | "
            f"{_ratio(r.get('peak_memory_vs_full'))} |"
        )
    lines += [
        "",
        "Published (PointGST, Point-MAE on PB_T50_RS, GPU): 1.30x full fine-tuning's time at 0.59x its memory.",
        "",
        f"PointGST's step spent in `torch.linalg.eigh`: {100 * eigh['eigh_share']:.2f}% "
        f"({1000 * eigh['eigh_time']:.1f} ms of a {1000 * eigh['step_time']:.0f} ms step, {eigh['eigh_calls']:.0f} "
        f"calls per step, {eigh['device']}; profiled separately with torch.profiler, in-process).",
        "",
    ]
    return "\n".join(lines)


def profile_eigh_share(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    *,
    steps: int = 3,
    warmup: int = 1,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> dict[str, Any]:
    """Share of a PointGST training step spent in ``torch.linalg.eigh``.

    Runs ``warmup`` untimed and ``steps`` profiled training steps (forward, loss, backward, AdamW step) of
    ``model`` (an adapted model) on ``batch = (points, labels)`` under :mod:`torch.profiler`, and sums the time of
    the eigendecomposition kernels (``aten::_linalg_eigh`` and, on a GPU, the device time of what it launches).

    Returns:
        ``{"step_time": median wall seconds per step, "eigh_time": seconds per step in eigh, "eigh_share": the
        ratio, "eigh_calls": eigh calls per step, "device": ...}``.
    """
    from torch.profiler import ProfilerActivity, profile

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    points, labels = batch
    model.train()
    cuda = points.is_cuda

    def step() -> None:
        loss = loss_fn(model(points), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    times = []
    with profile(activities=activities) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    eigh_us, calls = 0.0, 0
    for event in prof.key_averages():
        if "linalg_eigh" in event.key:
            # the op's wall time on the host (CUDA eigh waits for its kernels) or its kernels' device time
            total = max(event.cpu_time_total, event.device_time_total if cuda else 0.0)
            eigh_us = max(eigh_us, total)
            calls = max(calls, event.count)
    step_time = sorted(times)[len(times) // 2]
    eigh_time = eigh_us / 1e6 / steps
    return {
        "step_time": step_time,
        "eigh_time": eigh_time,
        "eigh_share": eigh_time / step_time if step_time else float("nan"),
        "eigh_calls": calls / steps,
        "device": str(points.device),
    }


def profile_point_peft(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    *,
    steps: int = 3,
    warmup: int = 1,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> dict[str, float]:
    """Where a Point-PEFT training step goes: wall seconds per step and saved bytes by part.

    Runs ``warmup`` untimed and ``steps`` timed training steps (forward, loss, backward, AdamW step) of ``model``
    (adapted with Point-PEFT) on ``batch = (points, labels)``, timing the parts of the forward that are Point-PEFT's
    own code: the frozen retrieval pass (``frozen_pass``), the prompts (``prompts``: the blocks' ``pre``) and the
    geometry adapter (``geometry``: the blocks' ``post``: local attention, pooling, propagation, ``adapter1``). The
    bytes autograd saves in one step (:func:`benchmarks.harness.saved_storages`) are split the same way: saved while
    the prompts or the geometry adapter run, or elsewhere (the backbone's layers and the MLP adapter). Returns
    medians over the steps: ``step``, ``forward``, ``backward``, ``optimizer``, ``frozen_pass``, ``prompts``,
    ``geometry`` (seconds) and ``saved_*`` (bytes)."""
    adapters = [m for m in model.modules() if isinstance(m, (PointPEFTContext, PointPEFTBlock))]
    if not any(isinstance(m, PointPEFTContext) for m in adapters):
        raise ValueError("profile_point_peft needs a model adapted with point_peft (no PointPEFTContext found)")
    clock: dict[str, float] = {}
    inside: list[str] = []

    def timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            inside.append(part)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[part] = clock.get(part, 0.0) + time.perf_counter() - start
                inside.pop()

        return run

    for m in adapters:  # instance attributes shadow the methods until they are deleted below
        if isinstance(m, PointPEFTContext):
            m._frozen_pass = timed("frozen_pass", m._frozen_pass)
        else:
            m.pre, m.post = timed("prompts", m.pre), timed("geometry", m.post)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    points, labels = batch
    model.train()
    rows: list[dict[str, float]] = []
    try:
        for i in range(warmup + steps):
            clock.clear()
            start = time.perf_counter()
            with saved_storages(model, lambda: inside[-1] if inside else "elsewhere") as saved:
                loss = loss_fn(model(points), labels)
            forward = time.perf_counter()
            loss.backward()
            backward = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            end = time.perf_counter()
            if i >= warmup:
                row = {"step": end - start, "forward": forward - start, "backward": backward - forward}
                row["optimizer"] = end - backward
                for part in ("frozen_pass", "prompts", "geometry"):
                    row[part] = clock.get(part, 0.0)
                for part in ("prompts", "geometry", "elsewhere"):
                    row[f"saved_{part}"] = float(sum(n for p, n in saved.values() if p == part))
                rows.append(row)
    finally:
        for m in adapters:
            for name in ("_frozen_pass", "pre", "post"):
                m.__dict__.pop(name, None)
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def point_peft_section(records: list[dict[str, Any]], parts: dict[str, float]) -> str:
    """Where Point-PEFT's training step and saved activations go (:func:`profile_point_peft`), beside the floor's
    and full fine-tuning's saved bytes from this run's records, as Markdown."""
    by_method = {r["method"]: r for r in records if not r.get("error")}
    step = parts["step"]
    rows = [
        ("forward", parts["forward"]),
        (
            "- of it, the frozen retrieval pass (a gradient-free forward of the backbone on half its patches, as the "
            "official frozen copy)",
            parts["frozen_pass"],
        ),
        ("- of it, the prompts (cache retrieval into the prompted blocks)", parts["prompts"]),
        ("- of it, the geometry adapter (local attention, pooling, propagation, adapter1)", parts["geometry"]),
        ("backward", parts["backward"]),
        ("AdamW step", parts["optimizer"]),
    ]
    lines = [
        "## Where Point-PEFT's step goes",
        "",
        f"One training step of Point-PEFT ({1000 * step:.0f} ms, median of the profiled steps, wall clock, in this "
        "process; `benchmarks.pointcloud.profile_point_peft`):",
        "",
        "| part | ms | share of the step |",
        "|---|---:|---:|",
        *(f"| {name} | {1000 * t:.0f} | {100 * t / step:.0f}% |" for name, t in rows),
        "",
    ]
    saved = {k: parts[f"saved_{k}"] for k in ("elsewhere", "geometry", "prompts")}
    total = sum(saved.values())
    reference = ", ".join(
        f"{name} {by_method[name]['saved_bytes'] / 2**20:.0f} MiB"
        for name in ("floor", "full", "lora")
        if name in by_method and by_method[name].get("saved_bytes") is not None
    )
    lines += [
        f"Bytes saved for backward in one step: {total / 2**20:.0f} MiB"
        + (f" (this run's {reference})" if reference else "")
        + f"; of them {saved['geometry'] / 2**20:.0f} MiB while the geometry adapter runs, "
        f"{saved['prompts'] / 2**20:.0f} MiB for the prompts and {saved['elsewhere'] / 2**20:.0f} MiB in the "
        "backbone's layers and the MLP adapter.",
        "",
    ]
    lines += _point_peft_bound(by_method, parts)
    return "\n".join(lines)


def _point_peft_bound(by_method: dict[str, dict[str, Any]], parts: dict[str, float]) -> list[str]:
    """What Point-PEFT's algorithm costs at least: the floor's step (backward through every block, which any method
    that trains inside the network pays) plus the gradient-free retrieval pass through the backbone, as a share
    of full fine-tuning's step (both step times from this run's records)."""
    floor, full = (by_method.get(n, {}).get("step_time") for n in ("floor", "full"))
    if not floor or not full:
        return []
    bound = floor + parts["frozen_pass"]
    return [
        f"What the algorithm needs at least: the floor's step ({1000 * floor:.0f} ms: backward through every block, "
        f"nothing trained inside) plus the retrieval pass ({1000 * parts['frozen_pass']:.0f} ms) = "
        f"{1000 * bound:.0f} ms, **{bound / full:.2f}x** full fine-tuning's step ({1000 * full:.0f} ms); Point-PEFT's "
        f"own layers (prompts, MLP and geometry adapters, bias deltas) take the step from there to "
        f"{1000 * parts['step']:.0f} ms ({parts['step'] / full:.2f}x; the profiled step runs in this process, "
        "the others each in a fresh one).",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
