"""The benchmark harness on a tiny ViT: records, ratios, JSON, table and plot. No timing is asserted."""

from __future__ import annotations

import copy
import functools
import json
import statistics
import sys

import peft
import pytest
import timm
import torch
from torch import nn

import modalpeft as mp
from benchmarks import harness, report, run
from benchmarks.harness import Candidate, measure

INPUT = (3, 16, 16)


def tiny_vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        num_classes=4,
    )  # fmt: skip


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, *INPUT), torch.randint(0, 4, (2,))


def fake_metric(model: nn.Module) -> float:
    with torch.no_grad():
        return float(model(torch.zeros(1, *INPUT)).softmax(-1)[0, 0])


CANDIDATES = [
    Candidate("full", "full"),
    Candidate("head_only", "head_only"),
    Candidate("lora", peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"])),
    Candidate("bitfit", mp.BitFitConfig()),
    Candidate("floor", "floor"),
]
KWARGS = dict(batch_factory=batch, loss_fn=nn.functional.cross_entropy, device="cpu", modules_to_save=["head"])


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    records = measure(
        tiny_vit, CANDIDATES, steps=2, warmup=1, evaluate=fake_metric, out_dir=out, run_name="tiny",
        run_info={"model": "tiny"}, isolate=False, threads=1, floor_from="blocks.0", **KWARGS,
    )  # fmt: skip
    return records, out


def test_records_have_every_field(measured):
    records, _ = measured
    assert [r["method"] for r in records] == ["full", "head_only", "lora", "bitfit", "floor"]
    for r in records:
        for key in ("trainable_params", "total_params", "file_size", "peak_memory", "model_memory", "saved_bytes"):
            assert isinstance(r[key], int) and r[key] >= 0, key
        assert r["file_size"] > 0 and r["trainable_params"] > 0
        for key in ("step_time", "merged_infer_time", "metric", "trainable_percent"):
            assert isinstance(r[key], float) and r[key] >= 0, key
        assert len(r["step_times"]) == 2 and len(r["infer_times"]) == 2
        assert r["step_time"] == statistics.median(r["step_times"])
        assert r["merged_infer_time"] == statistics.median(r["infer_times"])
        assert isinstance(r["merged"], bool)
        assert r["device"] == "cpu" and r["torch_version"] == torch.__version__ and r["threads"] == 1
        assert r["error"] is None and r["isolated"] is False
    by = {r["method"]: r for r in records}
    assert by["head_only"]["trainable_params"] < by["bitfit"]["trainable_params"] < by["full"]["trainable_params"]
    n_params = sum(p.numel() for p in tiny_vit().parameters())
    assert by["full"]["trainable_params"] == by["full"]["total_params"] == n_params
    assert by["head_only"]["trainable_params"] == sum(p.numel() for p in tiny_vit().head.parameters())
    assert by["full"]["file_size"] > by["lora"]["file_size"] > by["head_only"]["file_size"]
    modes = [by[m]["infer_mode"] for m in ("full", "head_only", "lora", "bitfit")]
    assert modes == ["plain", "plain", "merged", "merged"]
    assert by["lora"]["merged"] and not by["full"]["merged"]
    # the floor trains the head as head_only does, with backward through every block: it saves more than head_only
    # (which keeps only the head's input) and no more than full fine-tuning (which also needs every Linear's input)
    assert by["floor"]["trainable_params"] == by["head_only"]["trainable_params"]
    assert by["head_only"]["saved_bytes"] < by["floor"]["saved_bytes"] < by["full"]["saved_bytes"]
    for r in records:  # AdamW: parameter, gradient and two moments of 4 bytes each, plus a step counter per tensor
        assert 16 * r["trainable_params"] <= r["train_state_bytes"] <= 16 * r["trainable_params"] + 4096
        assert r["train_bytes"] == r["saved_bytes"] + r["train_state_bytes"]


def test_saved_activation_bytes_counts_each_saved_storage_once():
    x, target = torch.randn(3, 4), torch.zeros(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh())

    def total(out, _):
        return out.sum()

    # the Linear keeps its input for the weight's gradient (3 x 4 floats), Tanh its output (3 x 8); weights excluded
    assert harness.saved_activation_bytes(model, x, target, total) == 4 * (3 * 4 + 3 * 8)
    assert all(p.grad is None for p in model.parameters())  # the gradients it made are cleared
    model[0].requires_grad_(False)  # a frozen Linear needs only its weight for the input's gradient: Tanh's output
    assert harness.saved_activation_bytes(model, x.requires_grad_(), target, total) == 4 * 3 * 8
    x2 = torch.randn(3, 4)
    doubled = nn.Sequential(nn.Identity())  # the same storage saved twice (x * x) counts once

    def square(out, _):
        return (out * out).sum()

    assert harness.saved_activation_bytes(doubled, x2.requires_grad_(), target, square) == 4 * 3 * 4


def test_floor_from_a_module_that_does_not_exist_is_named():
    with pytest.raises(ValueError, match="floor_from='blocks.9'"):
        measure(tiny_vit, [Candidate("floor", "floor")], isolate=False, threads=1, floor_from="blocks.9", **KWARGS)


def test_ratios_match_raw_numbers(measured):
    records, _ = measured
    by = {r["method"]: r for r in records}
    for r in records:
        for ref in harness.REFERENCES:
            for field in harness.RATIO_FIELDS:
                base = by[ref][field]
                expected = None if base == 0 else r[field] / base
                assert r[f"{field}_vs_{ref}"] == expected, (r["method"], field, ref)
    assert by["full"]["step_time_vs_full"] == 1.0
    assert by["lora"]["trainable_params_vs_lora"] == 1.0


def test_json_round_trip(measured):
    records, out = measured
    run_info, loaded = report.load_records(out / "tiny.json")
    assert loaded == json.loads(json.dumps(records))
    assert run_info["model"] == "tiny" and run_info["steps"] == 2 and run_info["isolated"] is False
    for r in loaded:
        for key in ("method", "trainable_params", "file_size", "peak_memory", "step_time", "metric"):
            assert key in r
    assert loaded[2]["config"]["r"] == 8 and loaded[3]["config"]["method"] == "bitfit"


def test_report_table_and_plot(measured, tmp_path):
    records, _ = measured
    table, plot = report.render(records, tmp_path / "tiny", {"model": "tiny"})
    for r in records:
        assert f"| {r['method']} |" in table
    assert all(c in table for c in report.COLUMNS)
    assert (tmp_path / "tiny.md").read_text() == table
    assert plot == tmp_path / "tiny.png" and plot.stat().st_size > 0


def test_report_without_metric_skips_the_plot(measured, tmp_path):
    records = copy.deepcopy(measured[0])
    for r in records:
        r["metric"] = None
    table, plot = report.render(records, tmp_path / "cost")
    assert plot is None and not (tmp_path / "cost.png").exists()
    assert "n/a" in table and "no record has a metric" in table


def test_failed_candidate_is_recorded():
    bad = Candidate("bad_krona", mp.create_config("krona", target_modules=["qkv"], a1=5, a2=5))  # 5 divides nothing
    (record,) = measure(tiny_vit, [bad], steps=1, warmup=0, isolate=False, threads=1, on_error="record", **KWARGS)
    assert record["error"].startswith("ValueError") and record["step_time"] is None
    with pytest.raises(ValueError):
        measure(tiny_vit, [bad], steps=1, warmup=0, isolate=False, threads=1, **KWARGS)
    assert "failed: ValueError" in report.markdown_table([record])


def test_isolated_measure_runs_in_a_fresh_process():
    (record,) = measure(tiny_vit, [Candidate("bitfit", mp.BitFitConfig())], steps=1, warmup=0, threads=1, **KWARGS)
    assert record["isolated"] is True and record["error"] is None
    kind = record["peak_memory_kind"]
    assert kind.split(",")[0] in ("rss_hwm_growth", "ru_maxrss_growth")
    assert kind.endswith(", 1 MiB mmap threshold") == sys.platform.startswith("linux")  # glibc: the exact heap
    assert isinstance(record["peak_memory"], int) and record["file_size"] > 0


def test_candidate_validation():
    with pytest.raises(ValueError, match="not a baseline"):
        Candidate("x", "linear_probe")
    with pytest.raises(TypeError, match="must be a modalpeft config"):
        Candidate("x", {"r": 8})
    with pytest.raises(ValueError, match="unique"):
        measure(tiny_vit, [Candidate("a", "full"), Candidate("a", "head_only")], **KWARGS)


def test_run_covers_every_registered_method():
    preset = run.MODELS["vit_tiny_test"]
    chosen = run.candidates(embed_dim=preset["embed_dim"], input_size=(3, preset["img_size"], preset["img_size"]))
    names = [c.name for c in chosen]
    assert names[:4] == ["full", "head_only", "floor", "lora"]
    image_methods = {m for m in mp.list_methods() if mp.get_method(m).modality in ("core", "vision")}
    assert image_methods <= set(names)  # point-cloud methods need a point transformer: tests/pointcloud
    for c in chosen[3:]:  # every setting builds on a ViT of that width
        mp.adapt(run.build_model(**preset), copy.deepcopy(c.config), modules_to_save=["head"])


def test_run_model_factory_is_picklable():
    import pickle

    factory = functools.partial(run.build_model, **run.MODELS["vit_tiny_test"])
    assert pickle.loads(pickle.dumps(factory))().num_classes == run.NUM_CLASSES


def test_pointcloud_run_covers_every_point_method():
    from benchmarks import pointcloud

    chosen = pointcloud.candidates("point_mae_test", batch=2)
    names = [c.name for c in chosen]
    assert names[:4] == ["full", "head_only", "floor", "lora"]
    point_methods = {m for m in mp.list_methods() if mp.get_method(m).modality == "pointcloud"}
    assert point_methods and point_methods <= set(names)
    x, _ = pointcloud.synthetic_batch(2, pointcloud.MODELS["point_mae_test"]["points"])
    for c in chosen[3:]:  # every setting builds on the test model and runs
        model = mp.adapt(pointcloud.build_model("point_mae_test"), copy.deepcopy(c.config), modules_to_save=["head"])
        assert model(x).shape == (2, pointcloud.NUM_CLASSES)


def test_point_peft_profile_splits_the_step_and_leaves_the_model_as_it_was():
    from benchmarks import pointcloud
    from benchmarks.pointcloud import profile_point_peft
    from modalpeft.pointcloud.methods.point_peft import PointPEFTBlock, PointPEFTContext

    points = pointcloud.MODELS["point_mae_test"]["points"]
    torch.manual_seed(0)
    memory = [pointcloud.synthetic_batch(2, points, seed) for seed in (1, 2)]
    config = mp.PointPEFTConfig(memory_data=memory, **pointcloud.MODELS["point_mae_test"]["point_peft"])
    model = mp.adapt(pointcloud.build_model("point_mae_test"), config, modules_to_save=["head"])
    parts = profile_point_peft(model, pointcloud.synthetic_batch(2, points), steps=2, warmup=1)
    assert 0 < parts["frozen_pass"] < parts["forward"] and 0 < parts["geometry"] < parts["forward"]
    assert parts["forward"] + parts["backward"] + parts["optimizer"] <= parts["step"] * 1.001
    assert parts["saved_geometry"] > 0 and parts["saved_prompts"] > 0 and parts["saved_elsewhere"] > 0
    adapters = [m for m in model.modules() if isinstance(m, (PointPEFTBlock, PointPEFTContext))]
    assert adapters and not any({"pre", "post", "_frozen_pass"} & set(vars(m)) for m in adapters)
    records = [{"method": "floor", "saved_bytes": 2**20}, {"method": "full", "saved_bytes": 3 * 2**20}]
    text = pointcloud.point_peft_section(records, parts)
    assert "frozen retrieval pass" in text and "floor 1 MiB, full 3 MiB" in text
    assert "needs at least" not in text  # no step times in these records
    records[0]["step_time"], records[1]["step_time"] = 0.5, 1.0
    parts = {**parts, "frozen_pass": 0.3, "step": 1.4}
    text = pointcloud.point_peft_section(records, parts)
    assert "= 800 ms, **0.80x** full fine-tuning's step (1000 ms)" in text and "to 1400 ms (1.40x" in text
    with pytest.raises(ValueError, match="point_peft"):
        profile_point_peft(pointcloud.build_model("point_mae_test"), pointcloud.synthetic_batch(2, points))


def test_text_run_covers_every_text_method():
    from benchmarks import text

    chosen = text.candidates("bert_test")
    assert [c.name for c in chosen][:4] == ["full", "head_only", "floor", "lora"]
    text_methods = {m for m in mp.list_methods() if mp.get_method(m).modality == "text"}
    assert text_methods and text_methods <= {c.name for c in chosen}
    ids, _ = text.synthetic_batch("bert_test", 2)
    for c in chosen[3:]:  # every setting builds on the test model and runs
        model = mp.adapt(text.build_model("bert_test"), copy.deepcopy(c.config), modules_to_save=["head"])
        assert model(ids).shape == (2, text.NUM_CLASSES)


def test_audio_run_covers_every_audio_method_and_generates():
    from benchmarks import audio

    chosen = audio.candidates("musicgen_test")
    audio_methods = {m for m in mp.list_methods() if mp.get_method(m).modality == "audio"}
    assert audio_methods and audio_methods <= {c.name for c in chosen}
    assert {c.config.kind for c in chosen if c.name.startswith("music_adapter")} == {"linear", "conv", "transformer"}
    ids, targets = audio.synthetic_batch("musicgen_test", 2)
    for c in chosen[2:]:
        model = mp.adapt(audio.build_model("musicgen_test"), copy.deepcopy(c.config), modules_to_save=["head"])
        assert model(ids).shape == (targets.numel(), 16)
    speed = audio.generation_speed("musicgen_test", chosen[-1], batch=1, device="cpu", repeats=1)
    assert speed["gen_frames_per_s"] > 0 and speed["gen_realtime_factor"] == speed["gen_frames_per_s"] / 50


def test_before_after_table_reads_the_committed_ratios(tmp_path):
    """The committed runs get a before/after table from ``before_issue13.json``; another run name gets none."""
    records = [
        {"method": "spt", "saved_bytes_vs_floor": 1.08, "peak_memory_vs_full": 0.45, "step_time_vs_lora": 1.05},
        {"method": "newcomer", "saved_bytes_vs_floor": 1.0, "peak_memory_vs_full": None, "step_time_vs_lora": 1.0},
    ]
    text = report.before_after(records, "vit_base_patch16_224_b8_cpu")
    assert "| spt | 1.46x | 1.08x | 0.87x | 0.45x | 1.70x | 1.05x |" in text
    assert "| newcomer | - | 1.00x | - | - | - | 1.00x |" in text and "commit 8531247" in text
    assert report.before_after(records, "vit_tiny_test_b2_cpu") == ""
    assert report.before_after(records, "vit_base_patch16_224_b8_cpu", tmp_path / "absent.json") == ""
