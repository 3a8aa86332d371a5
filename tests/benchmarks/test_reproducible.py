"""``make bench`` is reproducible and leaves the checkout alone: seeded draws, a run folder by default."""

from __future__ import annotations

import pytest
import torch

import modalpeft as mp
from benchmarks import __main__ as bench
from benchmarks import run


def test_spt_sensitivity_data_and_its_trainable_count_are_the_same_every_run() -> None:
    """SPT's selection depends on the batch it scores parameters on: an unseeded batch changed its count."""
    preset = {k: v for k, v in run.MODELS["vit_tiny_test"].items() if k != "name"}
    input_size = (3, preset["img_size"], preset["img_size"])
    counts, batches = [], []
    for _ in range(2):
        torch.manual_seed(len(counts))  # a different global RNG state each time: the benchmark must not depend on it
        spt = next(c for c in run.candidates(preset["embed_dim"], input_size) if c.name == "spt").config
        batches.append(spt.sensitivity_data[0])
        torch.manual_seed(0)
        model = mp.adapt(run.build_model(run.MODELS["vit_tiny_test"]["name"], **preset), spt, modules_to_save=["head"])
        counts.append(model.trainable_summary()["trainable"])
    torch.testing.assert_close(batches[0], batches[1], rtol=0, atol=0)
    assert counts[0] == counts[1]


@pytest.mark.slow
def test_quick_bench_writes_a_run_folder(tmp_path, monkeypatch, capsys) -> None:
    """``python -m benchmarks --quick`` runs both benchmarks on their test-size models into outputs/bench/<stamp>."""
    monkeypatch.chdir(tmp_path)
    argv = ["--quick", "--steps", "1", "--warmup", "0", "--threads", "1", "--methods", "full", "head_only"]
    assert bench.main(argv) == 0
    folders = list((tmp_path / "outputs" / "bench").iterdir())
    assert len(folders) == 1
    names = sorted(p.name for p in folders[0].iterdir())
    assert "vit_tiny_test_b8_cpu.json" in names and "point_mae_test_b8_cpu.json" in names
    assert "tracker_test_b8_cpu.json" in names
    assert "musicgen_test_b2_cpu.json" in names and "musicgen_test_b2_cpu_generation.json" in names
    assert f"bench: results in {folders[0].relative_to(tmp_path)}/" in capsys.readouterr().out
