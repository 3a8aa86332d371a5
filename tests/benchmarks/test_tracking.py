"""The tracking benchmark: TMoE beside full fine-tuning, the head and LoRA at equal rank on the tracker, and its
report (cost ratios and frames per second)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import modalpeft as mp
from benchmarks import tracking
from modalpeft.tracking.models import OneStreamTracker


def test_candidates_cover_tmoe_and_the_baselines() -> None:
    chosen = tracking.candidates("tracker_test")
    assert [c.name for c in chosen] == ["full", "head_only", "lora", "tmoe"]
    tracking_methods = {m for m in mp.list_methods() if mp.get_method(m).modality == "tracking"}
    assert tracking_methods <= {c.name for c in chosen}
    inputs, boxes = tracking.synthetic_batch("tracker_test", 2)
    for c in chosen[2:]:
        model = mp.adapt(
            tracking.build_model("tracker_test"), copy.deepcopy(c.config), modules_to_save=["head", "embeddings"]
        )
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert not any(".head." in n and ("lora" in n or "adapters" in n) for n in trainable)  # the head trains whole
        assert torch.isfinite(tracking.loss(model(*inputs), boxes))


def test_spmtrack_b_lora_at_equal_rank_count() -> None:
    """LoRA r = 64 on fused qkv, proj, fc1, fc2: r·(d_in + d_out) each, 786,432 per ViT-B block."""
    config = tracking.candidates("spmtrack_b")[2].config
    with torch.device("meta"):
        model = mp.adapt(OneStreamTracker(), config, modules_to_save=list(OneStreamTracker.trainable_modules))
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    per_block = 64 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))
    assert per_block == 786_432 and lora == 12 * per_block


@pytest.mark.slow
def test_quick_tracking_bench_reports_ratios_and_fps(tmp_path) -> None:
    argv = ["--quick", "--batch", "2", "--steps", "1", "--warmup", "0", "--threads", "1"]
    assert tracking.main([*argv, "--results-dir", str(tmp_path), "--methods", "full", "lora", "tmoe"]) == 0
    records = json.loads((tmp_path / "tracker_test_b2_cpu.json").read_text())["records"]
    tmoe = next(r for r in records if r["method"] == "tmoe")
    assert tmoe["step_time_vs_full"] > 0 and tmoe["peak_memory_vs_lora"] is not None and not tmoe["merged"]
    report = (tmp_path / "tracker_test_b2_cpu.md").read_text()
    assert "Training cost relative to full fine-tuning and to LoRA" in report
    assert "## Tracker frames per second" in report and "| tmoe (unmerged) |" in report
