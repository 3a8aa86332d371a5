"""The diffusion benchmark: its candidates' trainable counts on the test UNet (from the spec's shapes), its --quick
run's files, and --methods names of the other benchmarks skipped."""

from __future__ import annotations

import json

import pytest

from benchmarks import diffusion
from benchmarks.harness import _build


def test_candidates_train_what_they_say() -> None:
    """On the test UNet (widths 64 x 3 and 128 x 4 transformer blocks, text width 64): DiffuseKronA a1=64, a2=8 trains
    a1·a2 + (d_out/a1)(d_in/a2) per projection, LoRA r=4 r·(d_in + d_out), full attention every weight and the two
    to_out biases of a block."""

    def per_block(d: int, layer) -> int:
        return 6 * layer(d, d) + 2 * layer(d, 64)  # q/k/v/o of attn1 and q/o of attn2: d x d; attn2 k/v: d x 64

    def krona(d_out: int, d_in: int) -> int:
        return 64 * 8 + (d_out // 64) * (d_in // 8)

    def lora(d_out: int, d_in: int) -> int:
        return 4 * (d_in + d_out)

    def dense(d_out: int, d_in: int) -> int:
        return d_out * d_in

    blocks = ((64, 3), (128, 4))
    expected = {
        "diffusekrona": sum(n * per_block(d, krona) for d, n in blocks),
        "diffusekrona_kron": sum(n * per_block(d, krona) for d, n in blocks),
        "lora": sum(n * per_block(d, lora) for d, n in blocks),
        "full_attention": sum(n * (per_block(d, dense) + 2 * d) for d, n in blocks),
    }
    for candidate in diffusion.candidates("unet_test"):
        if candidate.name not in expected:
            continue
        model, _ = _build(diffusion.build_model("unet_test"), candidate, list(candidate.modules_to_save or ()))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == expected[candidate.name], candidate.name


def test_other_benchmarks_method_names_are_skipped(capsys) -> None:
    assert diffusion.main(["--model", "unet_test", "--methods", "full", "head_only"]) == 0
    assert "skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_run_writes_the_table_with_the_relative_columns(tmp_path) -> None:
    argv = ["--model", "unet_test", "--steps", "1", "--warmup", "0", "--threads", "1", "--results-dir", str(tmp_path)]
    argv += ["--gradient-checkpointing"]
    assert diffusion.main([*argv, "--methods", "diffusekrona", "lora", "full_attention"]) == 0
    data = json.loads((tmp_path / "unet_test_b1_cpu.json").read_text())
    records = {r["method"]: r for r in data["records"]}
    assert set(records) == {"diffusekrona", "lora", "full_attention"} and data["run"]["batch"] == 1
    assert data["run"]["gradient_checkpointing"] is True
    assert records["diffusekrona"]["trainable_params"] == 29_760 and records["lora"]["step_time_vs_lora"] == 1.0
    assert records["lora"]["step_time_vs_full_attention"] is not None
    assert "step x full_attention" in (tmp_path / "unet_test_b1_cpu.md").read_text()
