"""The committed Fashion-MNIST ViT: its file matches the manifest, loads, classifies real images as claimed, refuses
a corrupted copy, and takes a new head."""

from __future__ import annotations

import json
import math
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
SAMPLE = Path(__file__).parent / "data" / "fashion_mnist_t10k_first1000"  # its first 1,000 test images, committed


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


def correct(images: np.ndarray, labels: np.ndarray) -> torch.Tensor:
    """Whether the committed ViT classifies each image right, with the inputs every data module gives it."""
    model = fmnist_vit().eval()
    config = resolve_image_config(model)
    assert config.size == (28, 28) and config.channels == 1
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    x = (x - config.mean[0]) / config.std[0]
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(-1) for chunk in x.split(500)])
    return predictions == torch.as_tensor(labels.astype(np.int64))


def test_the_committed_test_sample_is_the_documented_one() -> None:
    readme = (SAMPLE / "README.md").read_text()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert sha256_of(SAMPLE / name) in readme, name
    images, labels = read_fashion_mnist(SAMPLE, "t10k")
    assert images.shape == (1000, 28, 28) and np.bincount(labels).tolist() == [
        107,
        105,
        111,
        93,
        115,
        87,
        97,
        95,
        95,
        95,
    ]


@pytest.mark.slow
def test_classifies_the_committed_fashion_mnist_test_sample_as_claimed() -> None:
    """The claims in the manifest, on the committed first 1,000 test images (no dataset install needed)."""
    right = correct(*read_fashion_mnist(SAMPLE, "t10k"))
    # the first 500 are the claim's own inputs: the same count of right answers (one image of slack for a
    # near-tie that another CPU's float summation order may flip)
    assert abs(int(right[:500].sum()) - round(MANIFEST["metrics"]["test_acc_first_500"] * 500)) <= 1
    # the 10,000-image claim: 1,000 of the 10,000 drawn without replacement (the release's test order is not
    # sorted by class) have a binomial standard error with the finite-population correction; 3 sigma is 2.9 points
    p, n, population = MANIFEST["metrics"]["test_acc"], len(right), 10_000
    sigma = math.sqrt(p * (1 - p) / n * (population - n) / (population - 1))
    assert abs(right.float().mean().item() - p) <= 3 * sigma


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_committed_sample_is_the_start_of_the_real_test_set() -> None:
    images, labels = read_fashion_mnist(FASHION_MNIST, "t10k")
    sample_images, sample_labels = read_fashion_mnist(SAMPLE, "t10k")
    assert np.array_equal(images[:1000], sample_images) and np.array_equal(labels[:1000], sample_labels)


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
