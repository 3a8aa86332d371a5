"""The committed Fashion-MNIST ViT: its file matches the manifest, loads, classifies real images as claimed, refuses
a corrupted copy, and takes a new head."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modalpeft.vision.backbones import (
    FMNIST_VIT_FILE,
    FMNIST_VIT_KWARGS,
    FMNIST_VIT_NAME,
    FMNIST_VIT_SHA256,
    fmnist_vit,
    sha256_of,
)
from modalpeft.vision.data import read_fashion_mnist, resolve_image_config

PRETRAINED = FMNIST_VIT_FILE.parent
MANIFEST = json.loads((PRETRAINED / "vit_fmnist.json").read_text())
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def test_committed_file_matches_manifest_and_code() -> None:
    assert FMNIST_VIT_FILE.is_file()
    assert FMNIST_VIT_FILE.stat().st_size <= 8 * 1024 * 1024
    assert FMNIST_VIT_FILE.stat().st_size == MANIFEST["file"]["bytes"]
    digest = sha256_of(FMNIST_VIT_FILE)
    assert digest == MANIFEST["file"]["sha256"] == FMNIST_VIT_SHA256
    assert digest in (PRETRAINED / "README.md").read_text()
    assert MANIFEST["model"]["name"] == FMNIST_VIT_NAME and MANIFEST["model"]["kwargs"] == FMNIST_VIT_KWARGS


def test_loads_with_timm_key_names_and_plain_timm() -> None:
    import timm

    model = fmnist_vit()
    assert sum(p.numel() for p in model.parameters()) == MANIFEST["model"]["parameters"]
    # the file is a plain timm state dict: timm's own checkpoint loading takes it too
    plain = timm.create_model(FMNIST_VIT_NAME, checkpoint_path=str(FMNIST_VIT_FILE), **FMNIST_VIT_KWARGS)
    for (name, a), (other, b) in zip(model.state_dict().items(), plain.state_dict().items(), strict=True):
        assert name == other and torch.equal(a, b)


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_classifies_real_fashion_mnist_test_images_as_claimed() -> None:
    images, labels = read_fashion_mnist(FASHION_MNIST, "t10k")
    images, labels = images[:500], torch.as_tensor(labels[:500].astype(np.int64))
    model = fmnist_vit().eval()
    config = resolve_image_config(model)  # what every data module applies with this backbone
    assert config.size == (28, 28) and config.channels == 1
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    x = (x - config.mean[0]) / config.std[0]
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == labels).float().mean().item()
    claimed = MANIFEST["metrics"]["test_acc_first_500"]
    assert accuracy == pytest.approx(claimed, abs=0.01)  # the same weights and inputs: the same number
    assert accuracy >= MANIFEST["metrics"]["test_acc"] - 0.03


def test_a_corrupted_copy_raises_the_sha256_error(tmp_path) -> None:
    copy = tmp_path / "vit_fmnist.safetensors"
    shutil.copyfile(FMNIST_VIT_FILE, copy)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last tensor
    copy.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        fmnist_vit(checkpoint_path=copy)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fmnist_vit(checkpoint_path=tmp_path / "missing.safetensors")


def test_new_head_keeps_the_pretrained_body() -> None:
    pretrained = fmnist_vit()
    model = fmnist_vit(num_classes=5)
    assert model.get_classifier().out_features == 5 and model.num_classes == 5
    assert torch.equal(model.patch_embed.proj.weight, pretrained.patch_embed.proj.weight)
    assert torch.equal(model.blocks[-1].mlp.fc2.weight, pretrained.blocks[-1].mlp.fc2.weight)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    features = fmnist_vit(num_classes=0)
    assert features(torch.randn(2, 1, 28, 28)).shape == (2, FMNIST_VIT_KWARGS["embed_dim"])
    random = fmnist_vit(pretrained=False)
    assert not torch.equal(random.patch_embed.proj.weight, pretrained.patch_embed.proj.weight)
    with pytest.raises(ValueError, match="num_classes"):
        fmnist_vit(num_classes=-1)
