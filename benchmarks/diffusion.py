"""DiffuseKronA on a Stable Diffusion UNet (random weights), side by side with LoRA, LoKr and full fine-tuning of the
attention (cost only).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.diffusion                               # SD-2.1-base UNet, CPU
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.diffusion --model unet_test --threads 1  # seconds: a check

Model: diffusers' ``UNet2DConditionModel`` built from the real SD-2.1-base ``unet/config.json``
(:data:`modalpeft.diffusion.backbones.SD21_BASE_UNET`, 866M parameters) with random weights; one training step is the
UNet's forward on batch-1 64x64 latents (a 512 px image) at timestep 500 with a 77-token text embedding (width 1024),
the MSE to a random noise target, backward and AdamW, as a DreamBooth step without the frozen VAE and text encoder.
Candidates, all on the official placement (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of ``attn1`` and ``attn2``):

- ``diffusekrona``: a1=64, a2=8, the official layout (output shuffle); ``diffusekrona_kron``: the plain ``A ⊗ B``;
- ``lora``: peft LoRA r=4 (the LoRA-DreamBooth baseline; the ``x lora`` column);
- ``lokr``: peft LoKr r=8, alpha=8 (the recipe ``sdxl_lokr_dreambooth.yaml``'s);
- ``full_attention``: those projections fine-tuned in place (the harness's ``head_only`` kind with them as its
  ``modules_to_save``).

``--gradient-checkpointing`` trains as the official DreamBooth scripts do (activations recomputed in the backward
pass). Memory: without it a candidate of the SD-2.1 run holds the 3.5 GB of fp32 weights and grows by 1.5-1.8 GiB in a
step (the committed ``benchmarks/results/sd21_base_unet_b1_cpu.md``: 1.4 GiB saved for backward, LoKr's 1.7), so about
5.5 GB; full attention fine-tuning adds 1.5 GiB of gradients and AdamW state. Pass it on a machine that holds less.

Through :func:`benchmarks.harness.measure` (parameters, file size, peak memory, step time, merged inference); the
appendix gives each candidate's step time and peak memory relative to LoRA, LoKr and full attention fine-tuning.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

import peft
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from modalpeft.diffusion import DiffuseKronAConfig
from modalpeft.diffusion.backbones import SD21_BASE_UNET, TEST_UNET, build_unet
from modalpeft.diffusion.methods.diffusekrona import UNET_ATTENTION_TARGETS
from modalpeft.lightning.demo import run_folder

from .harness import Candidate, add_ratios, default_device, measure, write_json
from .report import render
from .run import add_run_arguments, select

MODELS: dict[str, dict[str, Any]] = {
    "sd21_base_unet": {"config": SD21_BASE_UNET, "latent": 64, "tokens": 77},
    "unet_test": {"config": TEST_UNET, "latent": 8, "tokens": 8},
}
"""The UNet config, the latent side and the text length of each ``--model``."""
REFERENCES = ("lora", "lokr", "full_attention")
PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_model(model: str, gradient_checkpointing: bool = False) -> nn.Module:
    unet = build_unet(MODELS[model]["config"])
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def synthetic_batch(model: str, batch: int, seed: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """Latents, a timestep and text embeddings (the UNet's keyword inputs) and a noise target, drawn from ``seed``."""
    preset, g = MODELS[model], torch.Generator().manual_seed(seed)
    side, width = preset["latent"], preset["config"]["cross_attention_dim"]
    latents = torch.randn(batch, 4, side, side, generator=g)
    text = torch.randn(batch, preset["tokens"], width, generator=g)
    inputs = {"sample": latents, "timestep": torch.full((batch,), 500), "encoder_hidden_states": text}
    return inputs, torch.randn(batch, 4, side, side, generator=g)


def denoising_loss(output: Any, target: Tensor) -> Tensor:
    return F.mse_loss(output.sample, target)


def candidates(model: str) -> list[Candidate]:
    return [
        Candidate("diffusekrona", DiffuseKronAConfig(a1=64, a2=8)),
        Candidate("diffusekrona_kron", DiffuseKronAConfig(a1=64, a2=8, layout="kron")),
        Candidate("lora", peft.LoraConfig(r=4, lora_alpha=4, target_modules=PROJECTIONS)),
        Candidate("lokr", peft.LoKrConfig(r=8, alpha=8, target_modules=PROJECTIONS)),
        Candidate("full_attention", "head_only", modules_to_save=tuple(UNET_ATTENTION_TARGETS)),
    ]


def relative_table(records: list[dict[str, Any]]) -> str:
    """Step time and peak memory of each candidate relative to LoRA, LoKr and full attention fine-tuning."""
    add_ratios(records, REFERENCES)
    head = "| method | " + " | ".join(f"step x {r} | memory x {r}" for r in REFERENCES) + " |"
    lines = ["Relative to the references (this run):", "", head, "|---" + "|---:" * 2 * len(REFERENCES) + "|"]
    for record in records:
        cells = [
            "n/a" if record.get(f"{field}_vs_{ref}") is None else f"{record[f'{field}_vs_{ref}']:.2f}"
            for ref in REFERENCES
            for field in ("step_time", "peak_memory")
        ]
        lines.append(f"| {record['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd21_base_unet", choices=list(MODELS))
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the UNet's activations in the backward pass, as the official DreamBooth scripts train "
        "(less memory: the SD-2.1 run's peak without it is ~10 GB a candidate)",
    )
    add_run_arguments(parser)
    parser.set_defaults(batch=1, steps=3, warmup=1)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out) if args.out is not None else run_folder("outputs/bench")
    device = args.device or default_device()
    stem = out / f"{args.model}_b{args.batch}_{device.replace(':', '')}"
    run_info = {"model": args.model, "batch": args.batch, "metric": None}
    run_info["gradient_checkpointing"] = args.gradient_checkpointing
    run_info["input_size"] = [4, MODELS[args.model]["latent"], MODELS[args.model]["latent"]]
    run_info["note"] = "random weights and random latents: a cost-only run, metric is n/a"
    chosen = candidates(args.model)
    if args.methods:  # ``python -m benchmarks --methods full head_only`` passes the other runs' names: skip those
        known = [m for m in args.methods if m in {c.name for c in chosen}]
        if not known:
            print(f"diffusion benchmark: none of --methods {args.methods} is a candidate here; skipped.")
            return 0
        chosen = select(chosen, known, parser)
    records = measure(
        functools.partial(build_model, args.model, args.gradient_checkpointing),
        chosen,
        batch_factory=functools.partial(synthetic_batch, args.model, args.batch),
        loss_fn=denoising_loss,
        steps=args.steps,
        warmup=args.warmup,
        device=device,
        threads=args.threads,
        on_error="record",
        progress=True,
    )
    appendix = relative_table(records)  # adds the ratios to LoKr and full attention fine-tuning to the records
    info = {"steps": args.steps, "warmup": args.warmup, "device": device, "torch_version": torch.__version__}
    write_json(stem.with_suffix(".json"), records, {**info, "threads": records[0]["threads"], **run_info})
    table, _ = render(records, stem, run_info, appendix)
    print(table)
    print(f"{run_info['note']}. Wrote {stem}.json and .md in {time.perf_counter() - start:.0f} s.")
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
