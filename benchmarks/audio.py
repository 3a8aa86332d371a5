"""The music adapters on MusicGen's decoder with random weights, beside LoRA and full fine-tuning (cost only).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.audio                               # MusicGen-small's decoder
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.audio --frames 100 --gen-frames 50 --batch 1  # a shorter run
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.audio --model musicgen_test --threads 1  # seconds: a check

Candidates: full fine-tuning of the decoder, its LM heads only, peft LoRA (r=4, alpha=16 on the attention's q/v,
as ``recipes/audio/musicgen_medium_lora.yaml``) and the three ``music_adapter`` kinds at the bottlenecks of the
medium recipes (linear 256, conv 144, transformer 160), through :func:`benchmarks.harness.measure` (parameters, file
size, peak training memory, step time, ratios to full fine-tuning, the heads and LoRA). The model is
``MusicgenForCausalLM``'s decoder and LM heads (``head``: the per-codebook heads) over random codes: ``batch`` clips
of ``frames`` code frames (50 frames = 1 s of MusicGen audio), next-code cross-entropy over every codebook. Then
each candidate's model generates ``gen_frames`` frames greedily with the key/value cache (the conv and transformer
adapters keep their own state across steps), and the run reports frames per second (each frame is one code per
codebook) and the real-time factor. ``musicgen_small`` has the real decoder shape (24 blocks, width 1024, 16 heads,
FFN 4096, 4 codebooks of 2048 codes); nothing downloads.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from typing import Any

import peft
import torch
from torch import Tensor, nn

import modalpeft as mp
from modalpeft.audio.backbones import decoder_config, musicgen_decoder
from modalpeft.lightning.demo import run_folder

from .harness import Candidate, default_device
from .run import add_run_arguments, measure_and_report, select

MODELS: dict[str, dict[str, Any]] = {
    "musicgen_small": {"size": "small", "frames": 250, "gen_frames": 100, "bottlenecks": (256, 144, 160)},
    "musicgen_test": {"size": "test", "frames": 12, "gen_frames": 8, "bottlenecks": (8, 8, 8)},
}
"""Each model's decoder size, training clip length and generated length (in frames), and the adapters' bottlenecks
(linear, conv, transformer)."""
FRAME_RATE = 50  # MusicGen's EnCodec frames per second


class MusicLM(nn.Module):
    """A MusicGen decoder and its LM heads: ``(B·K, T)`` codes -> ``(B·K·T, V)`` next-code logits."""

    def __init__(self, size: str) -> None:
        super().__init__()
        lm = musicgen_decoder(size)
        self.num_codebooks = lm.num_codebooks
        self.decoder, self.head = lm.model, lm.lm_heads

    def forward(self, input_ids: Tensor) -> Tensor:
        hidden = self.decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, d)
        return torch.stack([head(hidden) for head in self.head], 1).flatten(0, 2)


def build_model(model: str) -> nn.Module:
    return MusicLM(MODELS[model]["size"])


def synthetic_batch(model: str, batch: int, frames: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    config = decoder_config(MODELS[model]["size"])
    g = torch.Generator().manual_seed(seed)
    frames, books = frames or MODELS[model]["frames"], config.num_codebooks
    codes = torch.randint(0, config.vocab_size, (batch, books, frames + 1), generator=g)
    return codes[..., :-1].reshape(batch * books, frames), codes[..., 1:].flatten()


def candidates(model: str) -> list[Candidate]:
    linear, conv, transformer = MODELS[model]["bottlenecks"]
    return [
        Candidate("full", "full"),
        Candidate("head_only", "head_only"),
        Candidate("lora", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
        Candidate("music_adapter", mp.MusicAdapterConfig(kind="linear", bottleneck=linear)),
        Candidate("music_adapter_conv", mp.MusicAdapterConfig(kind="conv", bottleneck=conv)),
        Candidate("music_adapter_transformer", mp.MusicAdapterConfig(kind="transformer", bottleneck=transformer)),
    ]


def generation_speed(
    model: str, candidate: Candidate, batch: int, device: str, repeats: int = 2, frames: int | None = None
) -> dict[str, float]:
    """Greedy cached generation of ``frames`` frames (default: the model's ``gen_frames``) from a start frame with
    ``candidate`` in place: the median over ``repeats`` runs (after one untimed run) of frames per second, and its
    real-time factor."""
    torch.manual_seed(0)
    lm = musicgen_decoder(MODELS[model]["size"])
    if not isinstance(candidate.config, str):
        lm = mp.adapt(lm, candidate.config)
    lm.to(device).eval()
    frames = frames or MODELS[model]["gen_frames"]
    start = torch.full((batch * lm.num_codebooks, 1), lm.config.pad_token_id, device=device)
    kwargs = {"max_new_tokens": frames, "do_sample": False, "num_return_sequences": 1}
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            begin = time.perf_counter()
            lm.generate(start, **kwargs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - begin)
    per_second = batch * frames / statistics.median(times)
    return {"gen_frames_per_s": per_second, "gen_realtime_factor": per_second / FRAME_RATE / batch}


def generation_appendix(model: str, batch: int, chosen: list[Candidate], out_json: Any, frames: int):
    """The report's appendix: each candidate's generation speed (also written to ``out_json``)."""

    def appendix(records: list[dict[str, Any]], device: str) -> str:
        speeds = {c.name: generation_speed(model, c, batch, device, frames=frames) for c in chosen}
        base = speeds.get("full", {}).get("gen_frames_per_s")
        lines = [
            f"Greedy generation with the key/value cache, {frames} frames x batch {batch} on "
            f"{device} (frames/s: one code per codebook each; real time = {FRAME_RATE} frames/s per clip):",
            "",
            "| method | frames/s | x real time | vs plain decoder |",
            "|---|---|---|---|",
        ]
        for name, s in speeds.items():
            ratio = f"{s['gen_frames_per_s'] / base:.2f}" if base else "n/a"
            lines.append(f"| {name} | {s['gen_frames_per_s']:.1f} | {s['gen_realtime_factor']:.2f} | {ratio} |")
        out_json.write_text(json.dumps(speeds, indent=2) + "\n")
        return "\n".join(lines) + "\n"

    return appendix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="musicgen_small", choices=list(MODELS))
    parser.add_argument("--frames", type=int, default=None, help="training clip length in frames (50 per second)")
    parser.add_argument("--gen-frames", type=int, default=None, help="frames generated per clip")
    add_run_arguments(parser)
    parser.set_defaults(batch=2, steps=3, warmup=1)
    args = parser.parse_args(argv)
    chosen = select(candidates(args.model), args.methods, parser)
    frames = args.frames or MODELS[args.model]["frames"]
    gen_frames = args.gen_frames or MODELS[args.model]["gen_frames"]
    run_info = {"model": args.model, "batch": args.batch, "input_size": [frames], "metric": None}
    run_info["gen_frames"] = gen_frames
    run_info["note"] = "random weights and random codes: a cost-only run, metric is n/a"
    if args.out is None:
        args.out = run_folder("outputs/bench")
    device = args.device or default_device()
    gen_json = args.out / f"{args.model}_b{args.batch}_{device.replace(':', '')}_generation.json"
    records = measure_and_report(
        functools.partial(build_model, args.model),
        chosen,
        functools.partial(synthetic_batch, args.model, args.batch, frames),
        args,
        run_info,
        appendix=generation_appendix(args.model, args.batch, chosen, gen_json, gen_frames),
    )
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
