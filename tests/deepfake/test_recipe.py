"""The deepfake recipe through the CLI with a tiny open_clip tower; predict to CSV; PyAV decoding; the demo."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modalpeft.lightning import cli_main
from modalpeft.vision.deepfake.data import VideoFramesDataModule
from modalpeft.vision.deepfake.detector import DeepfakeDetector, open_clip_visual
from modalpeft.vision.deepfake.predict import decode_video, write_video

from .test_data import write_frames, write_real_fake

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "vision" / "clip_vitl14_lntune_ffpp.yaml"
TINY = [
    "--model.init_args.backbone.init_args.name=ViT-B-32",
    "--model.init_args.backbone.init_args.pretrained=null",
    "--model.init_args.backbone.init_args.vision_cfg",
    '{"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}',
    "--model.init_args.backbone.init_args.text_cfg",
    '{"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}',
    "--trainer.precision=32-true",
    "--trainer.accelerator=cpu",
    "--data.init_args.num_workers=0",
    "--data.init_args.batch_size=4",
    "--data.init_args.val_root=null",
    "--data.init_args.compression=null",
    "--data.init_args.val_fraction=0.34",
]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the CLI's default loggers write to ./outputs


def test_recipe_is_headed_by_its_command() -> None:
    header = RECIPE.read_text().split("\nseed_everything:")[0]
    assert header.startswith(f"# Command:  python recipes/deepfake.py fit --config recipes/vision/{RECIPE.name}")
    for key in ("# Runtime:", "# Expected:", "# Mirrors:", "--data.init_args.root", "104,450"):
        assert key in header


def test_recipe_trains_two_steps_then_predicts_per_video_csv(tmp_path) -> None:
    data = write_real_fake(tmp_path / "data", real=3, fake=3, frames=3)
    args = ["--config", str(RECIPE), *TINY, f"--data.init_args.root={data}"]
    fit = cli_main(
        ["fit", *args, "--trainer.fast_dev_run=2", f"--trainer.default_root_dir={tmp_path}"],
        DeepfakeDetector,
        VideoFramesDataModule,
    )
    assert fit.trainer.global_step == 2
    task = fit.model
    trainable = {n: p.numel() for n, p in task.model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == (1 + 2 * 2 + 1) * 2 * 64 + 65 * 2  # 6 LayerNorms of width 64 + head
    assert fit.datamodule.datasets["train"][0][0].shape == (3, 32, 32)  # the tower's input size, not 224

    limits = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=2"]
    fit = cli_main(
        ["fit", *args, *limits, f"--trainer.default_root_dir={tmp_path}"], DeepfakeDetector, VideoFramesDataModule
    )
    logged = fit.trainer.callback_metrics
    assert {"val/auroc_video", "val/ap_video", "val/eer_video", "val/auroc_frame"} <= set(logged)
    checkpoint = fit.trainer.checkpoint_callback.best_model_path or fit.trainer.checkpoint_callback.last_model_path
    assert checkpoint

    clips = tmp_path / "clips"
    write_frames(clips / "folder_video", 2)
    rng = np.random.default_rng(0)
    write_video(clips / "clip.mp4", rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "predictions.csv"
    cli_main(
        [
            "predict",
            *args,
            f"--ckpt_path={checkpoint}",
            f"--data.init_args.predict_path={clips}",
            f"--model.init_args.predictions_path={out}",
            "--data.init_args.predict_frames=4",
        ],
        DeepfakeDetector,
        VideoFramesDataModule,
    )
    rows = list(csv.DictReader(out.open()))
    assert [(r["video"], r["frames"]) for r in rows] == [("clip", "4"), ("folder_video", "2")]
    assert all(0.0 <= float(r["fake_probability"]) <= 1.0 for r in rows)


def test_pyav_decoding_and_its_errors(tmp_path) -> None:
    frames = np.zeros((7, 16, 16, 3), dtype=np.uint8)
    frames[:, :, :8] = 255
    write_video(tmp_path / "a.mp4", frames)
    decoded = decode_video(tmp_path / "a.mp4", 3)
    assert len(decoded) == 3 and decoded[0].size == (16, 16)
    assert len(decode_video(tmp_path / "a.mp4", None)) == 7
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    with pytest.raises(ValueError, match="cannot decode video file .*broken.mp4"):
        decode_video(tmp_path / "broken.mp4")
    import av

    with av.open(str(tmp_path / "empty.mp4"), mode="w") as container:  # a video stream with no frames
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 16
    with pytest.raises(ValueError, match="empty.mp4.* (holds no frames|cannot decode)|cannot decode video file"):
        decode_video(tmp_path / "empty.mp4")


def test_quick_demo_runs_and_reports_every_contender(tmp_path) -> None:
    pytest.importorskip("skimage")
    from modalpeft.vision.deepfake.demo import run

    report = run(quick=True, out_dir=tmp_path / "demo")
    methods = {(r["split"], r["method"]) for r in report["results"]}
    assert len(methods) == 6
    counts = {r["method"]: r["trainable_params"] for r in report["results"]}
    assert counts["LN tuning (peft)"] == 13 * 2 * 128 + 258 and counts["linear probe"] == 258
    assert counts["full fine-tuning"] == next(
        r["total_params"] for r in report["results"] if r["method"] == "full fine-tuning"
    )
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["results"] == report["results"]
    assert "| held-out region | LN tuning (peft) |" in (tmp_path / "demo" / "deepfake.md").read_text()


def _quick_gelu_reference(x):
    """The activation the OpenAI CLIP weights were trained with (and transformers' ``quick_gelu``)."""
    return x * torch.sigmoid(1.702 * x)


@pytest.mark.slow
def test_recipe_encoder_is_the_quickgelu_architecture_of_the_openai_weights() -> None:
    import yaml

    backbone = yaml.safe_load(RECIPE.read_text())["model"]["init_args"]["backbone"]
    assert backbone["class_path"] == "modalpeft.vision.deepfake.open_clip_visual"
    args = backbone["init_args"]
    assert args["pretrained"] == "openai" and args["name"] == "ViT-L-14-quickgelu"
    tiny_text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    visual = open_clip_visual(args["name"], pretrained=None, text_cfg=tiny_text)  # the real ViT-L/14 tower, offline
    assert len(visual.transformer.resblocks) == 24 and visual.transformer.width == 1024
    x = torch.linspace(-6, 6, 101)
    for block in visual.transformer.resblocks:
        torch.testing.assert_close(block.mlp.gelu(x), _quick_gelu_reference(x), rtol=0, atol=1e-6)
    assert open_clip_visual.__defaults__[0] == "ViT-L-14-quickgelu"


def test_openai_weights_on_a_gelu_config_are_refused() -> None:
    with pytest.raises(ValueError, match="ViT-L-14-quickgelu"):
        open_clip_visual("ViT-L-14", pretrained="openai")
