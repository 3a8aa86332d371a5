"""CLIP-I, CLIP-T and DINO with tiny random encoders, against a transcription of the definitions (mean pairwise cosine
of the encoders' embeddings), and the messages when the weights are missing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from modalpeft.diffusion import metrics

from .pipelines import tiny_clip, tiny_dino, tiny_tokenizer


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(), tiny_tokenizer()


@pytest.fixture(scope="module")
def dino_model():
    return tiny_dino()


def images(n: int, seed: int, size: int = 40) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_clip_i_and_clip_t_match_the_definitions(clip) -> None:
    model, tokenizer = clip
    generated, real = images(3, 0), images(2, 1, size=48)

    def embed(x: torch.Tensor) -> torch.Tensor:  # CLIP's preprocessing: bicubic resize, centre crop, its mean / std
        x = TF.center_crop(TF.resize(x, 32, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), [32, 32])
        x = x.clamp(0, 1)  # as PIL's uint8 resize keeps the overshoot of bicubic in range
        x = TF.normalize(x, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
        with torch.no_grad():
            return F.normalize(model.visual_projection(model.vision_model(pixel_values=x).pooler_output), dim=-1)

    g, r = embed(generated), embed(real)
    expected = sum(float(g[i] @ r[j]) for i in range(3) for j in range(2)) / 6
    assert metrics.clip_i(generated, real, model) == pytest.approx(expected, abs=1e-5)
    assert metrics.clip_i(real, real, model) < 1 and metrics.clip_i(real[:1], real[:1], model) == pytest.approx(1)

    prompts = ["a dog", "a cat", "a dog in snow"]
    ids = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.text_model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).pooler_output
    t = F.normalize(model.text_projection(hidden), dim=-1)
    expected_t = sum(float(g[i] @ t[i]) for i in range(3)) / 3
    assert metrics.clip_t(generated, prompts, model, tokenizer) == pytest.approx(expected_t, abs=1e-5)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        metrics.clip_t(generated, prompts[:2], model, tokenizer)


def test_dino_matches_the_definition_and_takes_pil_images(dino_model) -> None:
    generated, real = images(2, 2), images(3, 3)
    with torch.no_grad():  # timm's default eval transform: resize to size / 0.9 (bicubic), centre crop, ImageNet norm
        x = lambda t: TF.normalize(  # noqa: E731
            TF.center_crop(TF.resize(t, int(32 / 0.9), interpolation=TF.InterpolationMode.BICUBIC, antialias=True), 32)
            .clamp(0, 1),
            [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
        )  # fmt: skip
        g, r = F.normalize(dino_model(x(generated)), dim=-1), F.normalize(dino_model(x(real)), dim=-1)
    assert metrics.dino(generated, real, dino_model) == pytest.approx(float((g @ r.T).mean()), abs=1e-5)
    pil = [TF.to_pil_image(t) for t in real]
    pil.append(Image.new("L", (50, 30), 100))  # another mode and size: converted, resized on its own
    score = metrics.dino(generated, pil, dino_model)
    assert -1 <= score <= 1
    both = metrics.personalisation_metrics(generated, real, "a dog", dino_model=dino_model)
    assert set(both) == {"dino"}


def test_bad_images_and_missing_weights_are_explained(clip) -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 8\)"):
        metrics.clip_i(torch.rand(2, 3, 8), images(1, 0), clip[0])
    with pytest.raises(ValueError, match="not available here.*download them once"):
        metrics.load_clip("no-such-owner/no-such-clip")
    with pytest.raises(ValueError, match="not available here"):
        metrics.load_dino("vit_small_patch16_224.dino")  # offline, not cached
