"""The classification task (OA, mean class accuracy, voting), masked point modelling, the committed weights and the
demo's quick run."""

from __future__ import annotations

import pytest
import torch

from modalpeft.pointcloud import create_backbone
from modalpeft.pointcloud.pretrain import MaskedPointModel, chamfer_l2, random_mask
from modalpeft.pointcloud.pretrained import MESHES_FILE, export_encoder, pretrained_backbone, sha256_of
from modalpeft.pointcloud.tasks import PointCloudClassificationTask


def tiny(num_classes: int = 3):
    torch.manual_seed(0)
    return create_backbone("point_mae_test", num_classes=num_classes)


def test_overall_and_mean_class_accuracy() -> None:
    task = PointCloudClassificationTask(tiny(), num_classes=3, modules_to_save=["head"])
    predicted = torch.tensor([0, 0, 0, 0, 2])
    labels = torch.tensor([0, 0, 0, 1, 2])
    task.test_metrics.update(torch.nn.functional.one_hot(predicted, 3).float(), labels)
    values = task.test_metrics.compute()
    assert values["test/acc"].item() == pytest.approx(0.8)  # 4 of 5 clouds
    assert values["test/macc"].item() == pytest.approx(2 / 3)  # per class: 1, 0, 1


def test_voting_averages_the_extra_views(clouds) -> None:
    task = PointCloudClassificationTask(tiny(), num_classes=3, adapter="full").eval()
    views = torch.stack([clouds, clouds * 1.1, clouds * 0.9])  # (1 + 2, B, N, 3)
    with torch.no_grad():
        plain, voted = task.logits(views)
        assert torch.allclose(plain, task.model(clouds))
        assert torch.allclose(voted, (task.model(clouds * 1.1) + task.model(clouds * 0.9)) / 2)
        assert task.logits(clouds)[1] is None
        task.step((views, torch.tensor([0, 1, 2, 0])), "test")
    assert {"test/acc_vote", "test/macc_vote"} <= set(task.vote_metrics.compute())
    assert task.hparams.lr == 5e-4 and task.hparams.weight_decay == 0.05 and task.hparams.warmup_epochs == 10


def test_chamfer_l2_by_hand() -> None:
    pred = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0]]])
    target = torch.tensor([[[0.0, 0, 0], [0.0, 2, 0]]])
    # pred -> target: 0 and 1 (squared); target -> pred: 0 and 4
    assert chamfer_l2(pred, target).item() == pytest.approx((0 + 1) / 2 + (0 + 4) / 2)


def test_random_mask_hides_exactly_the_ratio() -> None:
    mask = random_mask(5, 64, 0.6, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 64) and (mask.sum(1) == 38).all()
    assert not (mask[0] == mask[1]).all()


def test_masked_point_modelling_learns_on_a_fixed_batch(clouds) -> None:
    model = MaskedPointModel(tiny(0), decoder_depth=1, decoder_num_heads=2, num_points=128, seed=0)
    mask = random_mask(4, 16, 0.6, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model.reconstruction_loss(clouds, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert model.model.class_token.token.grad is None  # no class token in pretraining, as Point-MAE
    with pytest.raises(ValueError, match="mask_ratio=1.0 must lie strictly between 0 and 1"):
        MaskedPointModel(tiny(0), mask_ratio=1.0)


def test_export_and_sha256_check(tmp_path) -> None:
    encoder = pretrained_backbone(num_classes=0, pretrained=False)
    path = tmp_path / "weights.safetensors"
    digest = export_encoder(encoder, path)
    assert digest == sha256_of(path) and path.stat().st_size < 8 * 2**20  # float16, under the 8 MB limit
    with pytest.raises(ValueError, match="sha256 mismatch"):
        pretrained_backbone(5, checkpoint_path=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained_backbone(5, checkpoint_path=str(tmp_path / "missing.safetensors"))


@pytest.mark.skipif(not MESHES_FILE.is_file(), reason="the committed weights are not there yet")
def test_committed_weights_load() -> None:
    model = pretrained_backbone(num_classes=12)
    assert model.num_classes == 12 and model.embed_dim == 192
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head.")) == 3_087_744
    assert MESHES_FILE.stat().st_size <= 8 * 10**6


@pytest.mark.slow
def test_demo_quick_run(tmp_path, monkeypatch) -> None:
    from modalpeft.pointcloud.demo import run

    monkeypatch.setenv("MODALPEFT_CACHE", str(tmp_path / "cache"))
    report = run(quick=True, out_dir=tmp_path, pretrained=MESHES_FILE.is_file())
    methods = [r["method"] for r in report["results"]]
    assert methods == ["linear probe", "full fine-tuning", "pointgst", "point_peft"]
    by = {r["method"]: r for r in report["results"]}
    assert by["full fine-tuning"]["share_of_full"] == 1.0
    assert (
        by["linear probe"]["trainable_params"]
        < by["pointgst"]["trainable_params"]
        < 0.1 * by["full fine-tuning"]["trainable_params"]
    )
    assert (tmp_path / "results.json").is_file() and (tmp_path / "pointcloud.md").is_file()
    for name in ("pointgst", "point_peft"):  # the trained adapters reload exactly (BatchNorm statistics included)
        assert by[name]["reload_ok"] is True, by[name]
    assert by["linear probe"]["reload_ok"] is None
