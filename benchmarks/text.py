"""Text methods on transformers models with random weights, side by side with the baselines (cost only).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.text                              # RoBERTa-base, batch 8 x 128
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.text --model llama_7b_blocks      # 2 LLaMA-7B-sized blocks
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.text --model bert_test --threads 1  # seconds: a check

Candidates: full fine-tuning, the head only, peft LoRA r=8 on the query/value projections, and every native text
method (Houlsby, Pfeiffer, the parallel adapter, Compacter, LLM-Adapters, SoRA, LoFiT's head-selection stage,
DePT, MAM) at its paper's setting, through :func:`benchmarks.harness.measure` (parameters, file size, peak memory,
step time, ratios to full fine-tuning, the head and LoRA). The classifier is
:class:`modalpeft.text.tasks.TextClassifier` (mean pooling, last-token for LLaMA) over random token ids and labels:
the run measures cost, not accuracy. Models are built from transformers config classes with the real sizes
(RoBERTa-base: 12 layers, width 768; ``llama_7b_blocks``: LLaMA-7B's width 4,096, FFN 11,008, 32 heads, 2 of its
32 layers), so nothing downloads.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

import peft
import torch
import transformers
from torch import Tensor, nn

import modalpeft as mp
from modalpeft.text.backbones import tiny_config
from modalpeft.text.tasks import TextClassifier

from .harness import Candidate
from .run import add_run_arguments, measure_and_report, select

NUM_CLASSES = 2
MODELS: dict[str, dict[str, Any]] = {
    "roberta_base": {
        "config": lambda: transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1),
        "cls": "RobertaModel",
        "tokens": 128,
        "lora": ["query", "value"],
        "ffn": ["intermediate.dense", "output.dense"],
        "pooling": "mean",
    },
    "llama_7b_blocks": {
        "config": lambda: transformers.LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=2, vocab_size=32000
        ),
        "cls": "LlamaModel",
        "tokens": 128,
        "lora": ["q_proj", "v_proj"],
        "ffn": ["up_proj", "gate_proj"],
        "pooling": "last",
    },
    "bert_test": {
        "config": lambda: tiny_config("bert"),
        "cls": "BertModel",
        "tokens": 16,
        "lora": ["query", "value"],
        "ffn": ["intermediate.dense", "output.dense"],
        "pooling": "mean",
    },
}
"""Each model's config, the token count of a batch, LoRA's targets, the Linears LLM-Adapters adapts, the pooling."""


def build_model(name: str) -> nn.Module:
    preset = MODELS[name]
    return TextClassifier(getattr(transformers, preset["cls"])(preset["config"]()), NUM_CLASSES, preset["pooling"])


def synthetic_batch(model: str, batch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens, vocab = MODELS[model]["tokens"], MODELS[model]["config"]().vocab_size
    ids = torch.randint(3, vocab, (batch, tokens), generator=g)
    return ids, torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def candidates(model: str) -> list[Candidate]:
    preset = MODELS[model]
    small = model == "bert_test"  # width 32: Compacter's d/32 would be 1
    return [
        Candidate("full", "full"),
        Candidate("head_only", "head_only"),
        Candidate("floor", "floor"),
        Candidate("lora", peft.LoraConfig(r=8, lora_alpha=16, target_modules=preset["lora"])),
        Candidate("houlsby", mp.HoulsbyConfig(bottleneck_dim=64)),
        Candidate("pfeiffer", mp.PfeifferConfig(bottleneck_dim=64)),
        Candidate("parallel_adapter", mp.ParallelAdapterConfig(bottleneck_dim=16, scaling=4.0)),
        Candidate("compacter", mp.CompacterConfig(reduction_factor=4 if small else 32)),
        Candidate("llm_adapters", mp.LLMAdaptersConfig(bottleneck_dim=256, target_modules=preset["ffn"])),
        Candidate("sora", mp.SoRAConfig(rank=8)),
        Candidate("lofit", mp.LoFiTConfig(stage="scale")),
        Candidate("mam", mp.MAMConfig(bottleneck_dim=16, scaling=2.0, prefix_tokens=16)),
        Candidate("dept", mp.DePTConfig(num_tokens=8 if small else 60, rank=30, max_length=preset["tokens"])),
        # issue 19: weight-space methods, on LoRA's targets
        Candidate("svfit", mp.SVFitConfig(target_modules=preset["lora"])),
        Candidate("loldu", mp.LoLDUConfig(rank=15, target_modules=preset["lora"])),
        Candidate("neuroada", mp.NeuroAdaConfig(k=1, target_modules=preset["lora"])),
        Candidate("mtlora", mp.MTLoRAConfig(structure="ICFM", rank=8, target_modules=preset["lora"])),
        Candidate("paca", mp.PaCAConfig(rank=16, alpha=64.0, target_modules=preset["lora"])),  # LoRA r=8's count
        Candidate("increlora", mp.IncreLoRAConfig(target_rank=2, max_rank=8, target_modules=preset["lora"])),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="roberta_base", choices=list(MODELS))
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    tokens = MODELS[args.model]["tokens"]
    run_info = {"model": args.model, "batch": args.batch, "input_size": [tokens], "metric": None}
    run_info["note"] = "random weights and random token ids: a cost-only run, metric is n/a"
    records = measure_and_report(
        functools.partial(build_model, args.model),
        select(candidates(args.model), args.methods, parser),
        functools.partial(synthetic_batch, args.model, args.batch),
        args,
        run_info,
    )
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
