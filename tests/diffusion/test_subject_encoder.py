"""The committed self-supervised encoder that the diffusion demo measures subject fidelity with: checked on load, and
it tells one item of a class from the others, which the Fashion-MNIST ViT classifier (the previous judge) does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from modalpeft.diffusion.demo import instance_views
from modalpeft.diffusion.tiny import (
    FMNIST_ENCODER_FILE,
    SubjectEncoder,
    fmnist_subject_encoder,
    to_classifier,
    to_model,
)
from modalpeft.vision.idx import read_fashion_mnist

SAMPLE = Path(__file__).parents[1] / "vision" / "data" / "fashion_mnist_t10k_first1000"  # committed test images


def test_committed_encoder_is_checked_frozen_and_pooled(tmp_path) -> None:
    encoder = fmnist_subject_encoder()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    x = torch.rand(3, 1, 32, 32)
    assert encoder(x).shape == (3, SubjectEncoder().dim) and torch.equal(encoder(x), encoder(x))
    bad = tmp_path / FMNIST_ENCODER_FILE.name
    bad.write_bytes(FMNIST_ENCODER_FILE.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        fmnist_subject_encoder(checkpoint_path=bad)


def retrieval(embed, items: torch.Tensor) -> float:
    """Top-1 rate at which each instance view (the demo's: mirror image, 1-pixel shifts) of each item, plus mild noise,
    finds its own item among all of them, by cosine similarity of ``embed``'s features (images in [0, 1])."""
    model = to_model(items)  # (N, 1, 32, 32) in [-1, 1]
    originals = F.normalize(embed((model + 1) / 2), dim=-1)
    g = torch.Generator().manual_seed(0)
    hits = []
    for k in (1, 2, 3, 4, 5):  # every view but the photo itself
        views = torch.cat([instance_views(m[None])[k : k + 1] for m in model])
        views = ((views + 1) / 2 + 0.03 * torch.randn(views.shape, generator=g)).clamp(0, 1)
        found = (F.normalize(embed(views), dim=-1) @ originals.T).argmax(-1)
        hits.append(found == torch.arange(len(items)))
    return torch.cat(hits).float().mean().item()


@torch.no_grad()
def test_the_encoder_tells_one_bag_from_the_others_and_the_classifier_does_not() -> None:
    from modalpeft.vision.backbones import fmnist_vit

    images, labels = read_fashion_mnist(SAMPLE, "t10k")
    bags = torch.as_tensor(images[labels == 8])  # 95 bags the encoder never saw
    vit = fmnist_vit().eval()

    def vit_features(x: torch.Tensor) -> torch.Tensor:
        return vit.forward_head(vit.forward_features(to_classifier(x)), pre_logits=True)

    ours, theirs = retrieval(fmnist_subject_encoder(), bags), retrieval(vit_features, bags)
    assert ours >= 0.9 and ours > theirs + 0.2, (ours, theirs)


@torch.no_grad()
def test_the_demo_measures_subject_fidelity_with_it(tmp_path) -> None:
    from modalpeft.diffusion.demo import Demo, DiffusionSettings

    demo = Demo(DiffusionSettings.quick(out=str(tmp_path)))
    x = torch.rand(4, 1, 32, 32)
    assert torch.allclose(demo.embed(x), F.normalize(fmnist_subject_encoder()(x), dim=-1))
    assert torch.allclose(demo.reference, demo.embed((demo.instances + 1) / 2))
