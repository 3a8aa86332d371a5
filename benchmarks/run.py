"""``make bench``: every PEFT method on timm ViT-B/16 (random weights), side by side with the baselines.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.run                                    # 7-10 min *
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.run --model vit_tiny_test --threads 1  # ~40 s: a check
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.run --results-dir benchmarks/results   # the committed files

* measured on a shared 2-core CPU with a 1-minute load average of 2.5-5 (other jobs running); on a quiet
  machine it should take about half that. Under such load the CPU timings of one run can differ several
  fold between candidates measured minutes apart; each record's ``load_avg`` shows it, and ``--threads 1``
  suffers less from it than 2 threads.

Candidates: full fine-tuning, the head only (linear probe), peft LoRA r=8 on ``qkv`` and every registered
native method with the ViT settings of :func:`vit_settings` (a method missing there runs with its config's
defaults). Every candidate trains the new 10-class ``head`` too. Input: one synthetic batch of
``(batch, 3, H, W)`` images and random labels, cross-entropy. Random weights and synthetic data: the run
measures cost (parameters, file size, memory, time), not quality, so ``metric`` is n/a.

Writes ``<results-dir>/<model>_b<batch>_<device>.json`` and ``.md`` (by default a new run folder
``outputs/bench/<timestamp>``, git-ignored) and prints the table; every random draw is seeded (models, batches,
SPT's sensitivity batch), so parameter counts and file sizes are the same every run; on a GPU it runs unchanged
(``--device cuda`` is the default there). Exits with status 1 when a candidate failed (its row says why).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import timm
import torch
from torch import Tensor, nn

import modalpeft as mp
from modalpeft.core.layers.kronecker import most_square_factor
from modalpeft.lightning.demo import run_folder

from .harness import Candidate, default_device, measure
from .report import before_after, render

MODELS: dict[str, dict[str, Any]] = {
    "vit_base_patch16_224": {"name": "vit_base_patch16_224"},
    "vit_tiny_test": {
        "name": "vit_tiny_patch16_224",
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
    },
}
"""Presets for ``--model``; any other timm model name is built with its defaults."""
NUM_CLASSES = 10
MODALITIES = ("vision",)
"""Modality packages imported (when installed) so that their methods are registered and benchmarked too."""


def vit_settings(embed_dim: int, input_size: tuple[int, int, int]) -> dict[str, dict[str, Any]]:
    """Config arguments of each native method on a timm ViT of width ``embed_dim``: one table, no branches.

    - adapter: AdaptFormer's placement and its ViT-B bottleneck of 64 (``embed_dim / 12``).
    - krona: the attention projections (``qkv``, ``proj``), as the krona module recommends, with
      ``a1 = a2`` the most-square factor of the width (24 for 768): it divides the output widths (``3d`` of
      ``qkv``, ``d`` of ``proj``) and the input width ``d``.
    - vpt: VPT-deep with 10 prompts per block; ssf: the official placement (its defaults, which read the outputs of
      ``attn.proj`` and ``mlp.fc2`` back from the residual stream in backward); added by :func:`candidates`, the
      same placement recomputing those outputs from the Linears' inputs (``ssf_recompute``) or keeping them
      (``ssf_keep``, ``from_residual=False``).
    - spt: the paper's 0.4M budget on ViT-B (scaled with ``embed_dim²`` for other widths), LoRA structure,
      sensitivity from one synthetic batch of 8 (scoring is part of adapting, not of a training step).
    - svfit, loldu, neuroada, paca: the attention projections (``qkv``, ``attn.proj``) as krona; SVFit at full rank,
      LoLDU at its README's rank 15, NeuroAda at k = 1, PaCA at r = 16 (LoRA r = 8's count on a square Linear);
      mtlora: ICFM at rank 8 on ``qkv``; increlora: the official average target rank 2 with capacity 8 (the benchmark
      runs no growth: it measures the training step of the allocated adapter).
    """
    factor = most_square_factor(embed_dim)
    return {
        "bitfit": {},
        "adapter": {"style": "adaptformer", "bottleneck_dim": max(embed_dim // 12, 4)},
        "krona": {"target_modules": ["qkv", "proj"], "a1": factor, "a2": factor},
        "vpt": {"num_tokens": 10, "deep": True},
        "ssf": {},
        "spt": {
            "budget": max(int(400_000 * (embed_dim / 768) ** 2), 1_000),
            "batches": 1,
            "sensitivity_data": [synthetic_batch(8, input_size, seed=1)],
        },
        "svfit": {"target_modules": ["qkv", "attn.proj"]},
        "loldu": {"target_modules": ["qkv", "attn.proj"], "rank": 15},
        "neuroada": {"target_modules": ["qkv", "attn.proj"], "k": 1},
        "mtlora": {"target_modules": ["qkv"], "structure": "ICFM", "rank": 8},
        "paca": {"target_modules": ["qkv", "attn.proj"], "rank": 16, "alpha": 64.0},
        "increlora": {"target_modules": ["qkv", "attn.proj"], "target_rank": 2, "max_rank": 8},
    }


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """A timm model with random weights and a new ``NUM_CLASSES``-way head."""
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)


def synthetic_batch(batch: int, input_size: tuple[int, int, int], seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random images ``(batch, *input_size)`` and random labels, drawn from ``seed`` (the same every run)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_size, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def candidates(embed_dim: int, input_size: tuple[int, int, int]) -> list[Candidate]:
    """The baselines, peft LoRA and every registered native method for images (see :func:`vit_settings`); methods
    of other modalities (point clouds) need their own backbones and benchmarks."""
    for modality in MODALITIES:
        if importlib.util.find_spec(f"modalpeft.{modality}") is not None:
            importlib.import_module(f"modalpeft.{modality}")
    settings = vit_settings(embed_dim, input_size)
    out = [
        Candidate("full", "full"),
        Candidate("head_only", "head_only"),
        Candidate("floor", "floor"),
        Candidate("lora", peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"])),
    ]
    for method in mp.list_methods():
        if mp.get_method(method).modality not in ("core", "vision"):
            continue
        if method not in settings:
            print(f"note: {method!r} has no entry in vit_settings(); benchmarking its default config", file=sys.stderr)
        out.append(Candidate(method, mp.create_config(method, **settings.get(method, {}))))
    if any(c.name == "ssf" for c in out):  # SSF's other ways with the outputs that end each residual branch
        out.append(Candidate("ssf_recompute", mp.create_config("ssf", recompute_modules=["attn.proj", "mlp.fc2"])))
        out.append(Candidate("ssf_keep", mp.create_config("ssf", from_residual=False)))
    return out


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark run takes (besides its ``--model``)."""
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (and inference forwards)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--results-dir",
        "--out",
        dest="out",
        type=Path,
        default=None,
        help="where the JSON, table and plot go (default: a new outputs/bench/<timestamp>; benchmarks/results "
        "regenerates the committed files)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the GPU when there is one)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    parser.add_argument("--methods", nargs="*", default=None, help="run only these candidates (default: all)")


def select(chosen: list[Candidate], methods: list[str] | None, parser: argparse.ArgumentParser) -> list[Candidate]:
    """The candidates named by ``--methods`` (all without it); an unknown name is a usage error listing the names."""
    if not methods:
        return chosen
    unknown = sorted(set(methods) - {c.name for c in chosen})
    if unknown:
        parser.error(f"--methods {unknown} unknown; choose from {[c.name for c in chosen]}")
    return [c for c in chosen if c.name in methods]


def measure_and_report(
    factory: Any,
    chosen: list[Candidate],
    batch_factory: Any,
    args: argparse.Namespace,
    run_info: dict[str, Any],
    appendix: Callable[[list[dict[str, Any]], str], str] | None = None,
    floor_from: str | None = None,
    loss_fn: Callable[[Any, Tensor], Tensor] = nn.functional.cross_entropy,
    modules_to_save: tuple[str, ...] = ("head",),
) -> list[dict[str, Any]]:
    """:func:`measure` with the command line's settings (:func:`add_run_arguments`; by default cross-entropy and the
    ``head`` trained too; failures recorded), then the table printed and written to
    ``<out>/<model>_b<batch>_<device>.json`` / ``.md``, followed by ``appendix(records, device)`` when given;
    returns the records. ``floor_from``: where the ``"floor"`` candidate's backward starts (see :func:`measure`)."""
    start = time.perf_counter()
    if args.out is None:
        args.out = run_folder("outputs/bench")
    device = args.device or default_device()
    stem = args.out / f"{args.model}_b{args.batch}_{device.replace(':', '')}"
    records = measure(
        factory,
        chosen,
        batch_factory=batch_factory,
        loss_fn=loss_fn,
        steps=args.steps,
        warmup=args.warmup,
        device=device,
        modules_to_save=list(modules_to_save),
        out_dir=args.out,
        run_name=stem.name,
        run_info=run_info,
        threads=args.threads,
        on_error="record",
        progress=True,
        floor_from=floor_from,
    )
    extra = "\n".join(
        part for part in (appendix(records, device) if appendix else "", before_after(records, stem.name)) if part
    )
    table, _ = render(records, stem, run_info, extra)
    print(table)
    print(f"{run_info['note']}. Wrote {stem}.json and .md in {time.perf_counter() - start:.0f} s.")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224", help=f"a preset {list(MODELS)} or a timm name")
    add_run_arguments(parser)
    args = parser.parse_args(argv)

    preset = MODELS.get(args.model, {"name": args.model})
    factory = functools.partial(build_model, **preset)
    with torch.device("meta"):  # the model's width and input size, without allocating it
        probe = factory()
    input_size = tuple(probe.pretrained_cfg["input_size"])
    if "img_size" in preset:
        input_size = (input_size[0], preset["img_size"], preset["img_size"])
    embed_dim = probe.embed_dim
    del probe

    chosen = select(candidates(embed_dim, input_size), args.methods, parser)
    run_info = {"model": args.model, "batch": args.batch, "input_size": list(input_size), "metric": None}
    run_info["note"] = "random weights and synthetic data: a cost-only run, metric is n/a"

    records = measure_and_report(
        factory,
        chosen,
        functools.partial(synthetic_batch, args.batch, input_size),
        args,
        run_info,
        floor_from="blocks.0",
    )
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
