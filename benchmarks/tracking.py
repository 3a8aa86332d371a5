"""TMoE on SPMTrack's tracker shape (random weights), side by side with full fine-tuning, the head and LoRA.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.tracking                       # SPMTrack-B shape, batch 8
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.tracking --model tracker_test  # seconds: a check (--quick)

The model is :class:`modalpeft.tracking.models.OneStreamTracker` on DINOv2 ViT-B/14 (random weights), 3 templates of
196 px and 2 search frames of 378 px (1,318 tokens per pass, two passes per sample), trained with the official
criterion (IoU-aware BCE + GIoU). Candidates: full fine-tuning, the head only (head and learnable tokens: the
``"linear"`` baseline of the recipes), peft's LoRA at TMoE's rank (r = 64, alpha 64) on the same Linears (fused
``qkv``, ``proj``, ``fc1``, ``fc2`` of every block) and TMoE (r = 64, 4 experts). Every candidate trains the head and
the tokens. The table gives step time and peak memory with their ratios to full fine-tuning and to LoRA (the
``*_vs_full`` / ``*_vs_lora`` columns of :func:`benchmarks.harness.measure`), and the section below it the tracker's
frames per second at inference: ``batch x 2`` search frames over the measured forward time (``batch`` sequences in
parallel; TMoE cannot merge and runs unmerged, LoRA merged). Input: random crops and boxes; cost only.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

import peft
import torch
from torch import Tensor, nn

import modalpeft as mp
from modalpeft.tracking.losses import template_mask, tracking_loss
from modalpeft.tracking.models import OneStreamTracker

from .harness import Candidate
from .run import add_run_arguments, measure_and_report, select

MODELS: dict[str, dict[str, Any]] = {
    "spmtrack_b": {
        "tracker": {"backbone": "vit_base_patch14_dinov2", "template_size": 196, "search_size": 378},
        "rank": 64,
    },
    "tracker_test": {
        "tracker": {
            "backbone": "vit_base_patch14_dinov2",
            "template_size": 28,
            "search_size": 56,
            "backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
        },
        "rank": 4,
    },
}
"""The tracker's arguments and the rank of TMoE and LoRA (SPMTrack-B: 64; 4 for the test model)."""
NUM_TEMPLATES, NUM_SEARCH = 3, 2
LORA_TARGETS = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
"""The ViT blocks' Linears (a regex, so that the head's ``fc`` layers are not LoRA's)."""


def build_model(name: str) -> nn.Module:
    return OneStreamTracker(**MODELS[name]["tracker"])


def synthetic_batch(name: str, batch: int, seed: int = 0) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """Random crops, template masks from random boxes, and random target boxes (normalised x1, y1, x2, y2)."""
    g = torch.Generator().manual_seed(seed)
    z, x = MODELS[name]["tracker"]["template_size"], MODELS[name]["tracker"]["search_size"]
    feat = z // 14
    templates = torch.randn(batch, NUM_TEMPLATES, 3, z, z, generator=g)
    centre = 0.3 + 0.4 * torch.rand(batch, NUM_TEMPLATES + NUM_SEARCH, 2, generator=g)
    half = 0.05 + 0.15 * torch.rand(batch, NUM_TEMPLATES + NUM_SEARCH, 2, generator=g)
    boxes = torch.cat([centre - half, centre + half], dim=-1)
    masks = template_mask(boxes[:, :NUM_TEMPLATES] * z, (z, z), (feat, feat))
    searches = torch.randn(batch, NUM_SEARCH, 3, x, x, generator=g)
    return (templates, masks, searches), boxes[:, NUM_TEMPLATES:]


def loss(outputs: list[dict[str, Tensor]], boxes: Tensor) -> Tensor:
    """The official criterion (picklable for the harness's spawned processes)."""
    return tracking_loss(outputs, boxes)[0]


def candidates(name: str) -> list[Candidate]:
    rank = MODELS[name]["rank"]
    return [
        Candidate("full", "full"),
        Candidate("head_only", "head_only"),
        Candidate("lora", peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS)),
        Candidate("tmoe", mp.create_config("tmoe", rank=rank, num_experts=4, alpha=rank)),
    ]


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def appendix(records: list[dict[str, Any]], batch: int) -> str:
    """TMoE's (and every method's) step time and peak memory relative to full fine-tuning and to LoRA, and the
    tracker's frames per second from each record's inference time, as Markdown."""
    lines = [
        "## Training cost relative to full fine-tuning and to LoRA at equal rank",
        "",
        "| method | trainable | step time | x full | x lora | peak mem | x full | x lora |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ok = [r for r in records if not r.get("error")]
    for r in ok:
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {1000 * r['step_time']:.0f} ms | "
            f"{_x(r.get('step_time_vs_full'))} | {_x(r.get('step_time_vs_lora'))} | "
            f"{r['peak_memory'] / 2**20:.0f} MiB | {_x(r.get('peak_memory_vs_full'))} | "
            f"{_x(r.get('peak_memory_vs_lora'))} |"
        )
    lines += [
        "",
        "## Tracker frames per second (inference)",
        "",
        f"{batch} sequences in parallel, {NUM_SEARCH} search frames each per forward (templates embedded in the same "
        "forward); fps = frames / median forward time. TMoE runs unmerged (its gates depend on the input).",
        "",
        "| method | forward | frames/s | x full |",
        "|---|---:|---:|---:|",
    ]
    full = next((r for r in ok if r["method"] == "full"), None)
    for r in ok:
        fps = batch * NUM_SEARCH / r["merged_infer_time"]
        ratio = _x(full["merged_infer_time"] / r["merged_infer_time"]) if full else "n/a"
        lines.append(
            f"| {r['method']} ({r['infer_mode']}) | {1000 * r['merged_infer_time']:.0f} ms | {fps:.2f} | {ratio} |"
        )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="spmtrack_b", choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="the test-size tracker (tracker_test): seconds")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.model = "tracker_test"
    tracker = MODELS[args.model]["tracker"]
    run_info = {"model": args.model, "batch": args.batch, "metric": None, "tracker": tracker}
    run_info["input_size"] = [NUM_TEMPLATES, tracker["template_size"], NUM_SEARCH, tracker["search_size"]]
    run_info["note"] = "random weights and synthetic crops: a cost-only run, metric is n/a"
    records = measure_and_report(
        functools.partial(build_model, args.model),
        select(candidates(args.model), args.methods, parser),
        functools.partial(synthetic_batch, args.model, args.batch),
        args,
        run_info,
        lambda records, device: appendix(records, args.batch),
        loss_fn=loss,
        modules_to_save=tuple(OneStreamTracker.trainable_modules),
    )
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
