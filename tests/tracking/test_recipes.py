"""Every tracking recipe parses and trains two steps through the CLI on a tiny ViT and tiny GOT-10k sequences; the
exported adapter loads into a freshly built tracker and gives the trained model's outputs; ``test`` and ``predict``
run from the checkpoint."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import modalpeft as mp
from modalpeft.lightning import cli_main
from modalpeft.lightning.optim import param_groups
from modalpeft.tracking.models import OneStreamTracker
from modalpeft.tracking.tasks import TrackingTask
from modalpeft.tracking.track import track_main

from ..lightning.recipe_checks import SHORT_FIT
from .test_data import got10k

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes" / "tracking").glob("dinov2_b14_*_got10k.yaml"))
METHODS = ("tmoe", "lora", "full", "head")
CLASSES = (pl.LightningModule, pl.LightningDataModule)
TINY = [
    '--model.init_args.backbone.init_args.backbone_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2}',
    "--model.init_args.backbone.init_args.backbone=vit_base_patch14_dinov2",
    "--model.init_args.backbone.init_args.pretrained=false",
    "--model.init_args.backbone.init_args.template_size=28",
    "--model.init_args.backbone.init_args.search_size=56",
    "--data.init_args.template_size=28",
    "--data.init_args.search_size=56",
    "--data.init_args.max_gap=3",
    "--data.init_args.samples_per_epoch=4",
    "--data.init_args.val_samples=2",
    "--data.init_args.batch_size=2",
    "--data.init_args.num_workers=0",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
]
TINY_KW = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_ADAPTER = {
    "tmoe": ["--model.init_args.adapter.init_args.rank=4"],
    "lora": ["--model.init_args.adapter.init_args.r=4"],
}


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch) -> None:
    """The CLI's default loggers write to ./outputs: keep that out of the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return got10k(tmp_path_factory.mktemp("got10k"), n=10)


def test_every_recipe_is_there_and_headed_by_its_command() -> None:
    assert {p.name for p in RECIPES} == {f"dinov2_b14_{m}_got10k.yaml" for m in METHODS}
    for path in RECIPES:
        header = path.read_text().split("\nseed_everything:")[0]
        first = header.splitlines()[0]
        assert first.startswith("# Command:  python recipes/tracking.py fit --config") and path.name in first
        assert "# Runtime:" in header and "# Expected:" in header and "# Mirrors:" in header
        assert "--data.init_args.got10k" in header
    tmoe = (ROOT / "recipes" / "tracking" / "dinov2_b14_tmoe_got10k.yaml").read_text()
    assert "AO 76.5" in tmoe and "29.24M" in tmoe


def fit(recipe: Path, root: Path, tmp_path: Path, method: str):
    args = ["fit", "--config", str(recipe), *TINY, *SHORT_FIT, *TINY_ADAPTER.get(method, [])]
    args += [f"--data.init_args.got10k={root}", f"--trainer.default_root_dir={tmp_path}"]
    return cli_main(args, *CLASSES)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_two_steps_with_the_tiny_backbone(recipe, root, tmp_path) -> None:
    method = next(m for m in METHODS if f"_{m}_" in recipe.name)
    cli = fit(recipe, root, tmp_path, method)
    trainer, task = cli.trainer, cli.model
    assert isinstance(task, TrackingTask) and trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/iou", "val/giou", "val/bce"} <= set(metrics), sorted(metrics)
    assert all(torch.isfinite(v).all() for v in metrics.values()), metrics
    assert Path(trainer.checkpoint_callback.best_model_path).is_file()
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    total = {n for n, _ in task.model.named_parameters()}
    if method == "full":
        assert trainable == total
    elif method == "head":
        assert trainable and all(".head." in f".{n}" or ".embeddings." in f".{n}" for n in trainable)
    else:
        assert trainable != total and any(".head." in f".{n}" for n in trainable)
        assert any(".embeddings." in f".{n}" for n in trainable)
    # the export, loaded into the tracker built again from the recipe, gives the trained outputs
    spec = cli.config["fit"].model.init_args.backbone.init_args.as_dict()
    torch.manual_seed(0)
    loaded = mp.load_adapter(OneStreamTracker(**spec), Path(trainer.log_dir) / "adapter").eval()
    batch = next(iter(cli.datamodule.val_dataloader()))
    inputs = (batch["templates"], batch["template_masks"], batch["searches"])
    trained = task.model.cpu().eval()
    with torch.no_grad():
        for a, b in zip(loaded(*inputs), trained(*inputs), strict=True):
            torch.testing.assert_close(a["boxes"], b["boxes"])
            torch.testing.assert_close(a["score_map"], b["score_map"])


def test_recipe_tests_and_predicts_from_its_checkpoint(root, tmp_path) -> None:
    recipe = ROOT / "recipes" / "tracking" / "dinov2_b14_tmoe_got10k.yaml"
    checkpoint = fit(recipe, root, tmp_path, "tmoe").trainer.checkpoint_callback.best_model_path
    common = ["--config", str(recipe), *TINY, *TINY_ADAPTER["tmoe"], f"--data.init_args.got10k={root}"]
    test = cli_main(["test", *common, f"--ckpt_path={checkpoint}"], *CLASSES)
    metrics = test.trainer.callback_metrics
    assert {"test/loss", "test/iou", "test/ao", "test/sr50", "test/sr75"} <= set(metrics)  # GOT-10k val tracked
    assert 0 <= metrics["test/sr75"] <= metrics["test/sr50"] <= 1
    predict = cli_main(["predict", *common, f"--ckpt_path={checkpoint}", "--trainer.limit_predict_batches=1"], *CLASSES)
    (out,) = predict.trainer.predict_loop.predictions
    assert out["boxes"].shape == (2, 2, 4) and out["confidence"].shape == (2, 2)


def test_official_weight_decay_groups() -> None:
    """No decay on 1-D parameters and names matching the official ``embed`` exceptions; the track query decays."""
    tracker = OneStreamTracker("vit_base_patch14_dinov2", template_size=28, search_size=56, backbone_kwargs=TINY_KW)
    task = TrackingTask(tracker, mp.create_config("tmoe", rank=4))
    decayed, exempt = param_groups(task.model, 0.1, task.no_decay)
    names = {id(p): n for n, p in task.model.named_parameters()}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert any(n.endswith("embeddings.token_type_embed") for n in exempt_names)
    assert any(n.endswith("embeddings.query_embed") for n in exempt_names)
    assert any(n.endswith("embeddings.track_query") for n in decayed_names)
    assert any(n.endswith("head.cls_mlp.fc1.bias") for n in exempt_names)


def test_recipe_script_runs_in_process(root, tmp_path, monkeypatch) -> None:
    recipe = ROOT / "recipes" / "tracking" / "dinov2_b14_head_got10k.yaml"
    argv = ["tracking.py", "fit", "--config", str(recipe), *TINY, "--trainer.fast_dev_run=1"]
    monkeypatch.setattr(
        sys, "argv", [*argv, f"--data.init_args.got10k={root}", f"--trainer.default_root_dir={tmp_path}"]
    )
    runpy.run_path(str(ROOT / "recipes" / "tracking.py"), run_name="__main__")


def test_track_subcommand_writes_boxes_and_drawings(root, tmp_path, monkeypatch) -> None:
    from PIL import Image

    recipe = ROOT / "recipes" / "tracking" / "dinov2_b14_tmoe_got10k.yaml"
    cli = fit(recipe, root, tmp_path, "tmoe")
    adapter = Path(cli.trainer.log_dir) / "adapter"
    frames = root / "val" / "GOT-10k_Val_000001"
    overrides = [
        "--backbone-arg=backbone=vit_base_patch14_dinov2",
        "--backbone-arg=pretrained=false",
        '--backbone-arg=backbone_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2}',
        "--backbone-arg=template_size=28",
        "--backbone-arg=search_size=56",
    ]
    out = tmp_path / "run" / "boxes.txt"
    base = ["--config", str(recipe), "--adapter", str(adapter), "--input", str(frames), *overrides]
    argv = ["tracking.py", "track", *base, "--box", "8,14,12,10", "--output", str(out)]
    argv += ["--draw", str(tmp_path / "run" / "boxes.gif")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "recipes" / "tracking.py"), run_name="__main__")
    assert exit_info.value.code == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 10 and lines[0] == "8.0000,14.0000,12.0000,10.0000"
    boxes = np.array([[float(v) for v in line.split(",")] for line in lines])
    assert (boxes[:, 2:] > 0).all() and (boxes[:, 0] + boxes[:, 2] <= 64 + 1e-3).all()
    with Image.open(tmp_path / "run" / "boxes.gif") as gif:
        assert gif.n_frames == 10 and gif.size == (64, 48)
    strip = tmp_path / "strip.png"
    assert track_main([*base, "--box", "8,14,12,10", "--output", str(tmp_path / "b.txt"), "--draw", str(strip)]) == 0
    with Image.open(strip) as image:
        assert image.size == (8 * 64, 48)
    with pytest.raises(SystemExit):
        track_main([*base, "--box", "8,14,12", "--output", str(tmp_path / "c.txt")])
    # a video file in, an .mp4 copy with the boxes drawn out
    import av

    from modalpeft.tracking.inference import read_video

    video = tmp_path / "clip.mp4"
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in sorted(frames.glob("*.jpg")) or sorted(frames.glob("*.png")):
            image = np.asarray(Image.open(frame).convert("RGB"))
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    from_video = [*overrides, "--config", str(recipe), "--adapter", str(adapter), "--input", str(video)]
    drawn = tmp_path / "drawn" / "boxes.mp4"
    assert (
        track_main([*from_video, "--box", "8,14,12,10", "--output", str(tmp_path / "v.txt"), "--draw", str(drawn)]) == 0
    )
    assert len((tmp_path / "v.txt").read_text().splitlines()) == 10
    copy = list(read_video(drawn))
    assert len(copy) == 10 and copy[0].shape == (3, 48, 64)
    assert sorted(p.name for p in drawn.parent.iterdir()) == ["boxes.mp4"]  # written atomically, nothing else left


def test_evaluate_subcommand_writes_official_results(root, tmp_path) -> None:
    import json
    import shutil

    from modalpeft.tracking.track import evaluate_main

    recipe = ROOT / "recipes" / "tracking" / "dinov2_b14_head_got10k.yaml"
    adapter = Path(fit(recipe, root, tmp_path, "head").trainer.log_dir) / "adapter"
    data = tmp_path / "GOT-10k"
    shutil.copytree(root, data)
    test_seq = data / "test" / "GOT-10k_Test_000001"
    shutil.copytree(data / "val" / "GOT-10k_Val_000001", test_seq)
    (test_seq / "groundtruth.txt").write_text((test_seq / "groundtruth.txt").read_text().splitlines()[0] + "\n")
    for label in ("absence.label", "cover.label"):
        (test_seq / label).unlink()
    (data / "test" / "list.txt").write_text("GOT-10k_Test_000001\n")
    common = ["--config", str(recipe), "--adapter", str(adapter), "--dataset", "got10k", "--root", str(data)]
    common += [f"--backbone-arg={a.split('init_args.', 2)[2]}" for a in TINY if a.startswith("--model.")]
    assert evaluate_main([*common, "--split", "val", "--results", str(tmp_path / "val")]) == 0
    metrics = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert set(metrics) == {"ao", "sr50", "sr75"} and 0 <= metrics["ao"] <= 1
    assert evaluate_main([*common, "--split", "test", "--results", str(tmp_path / "test")]) == 0
    folder = tmp_path / "test" / "GOT-10k_Test_000001"
    rows = (folder / "GOT-10k_Test_000001_001.txt").read_text().splitlines()
    assert len(rows) == 10 and rows[0] == "8.000,14.000,12.000,10.000"
    assert len((folder / "GOT-10k_Test_000001_time.txt").read_text().splitlines()) == 10
    assert not (tmp_path / "test" / "metrics.json").exists()  # no annotations: files for the server only
