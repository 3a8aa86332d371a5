r"""A small pixel-space text-to-image diffusion model pretrained on Fashion-MNIST: the offline embedded default.

No diffusion weights exist offline, so ``recipes/diffusion/pretrain_fmnist_unet.py`` pretrains this model and
``pretrained/`` ships its weights (``pretrained/README.md``: the command, the data source and the sha256). It is the
same kind of model as Stable Diffusion without the VAE:

- a diffusers ``UNet2DConditionModel`` (:data:`FMNIST_UNET`: 32x32 grey images, widths 32/64/64, cross-attention on
  the 16x16 and 8x8 levels, 1.69M parameters) that predicts the noise ``ε`` of ``x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε``;
- a CLIP-style text encoder (transformers ``CLIPTextModel``, :data:`FMNIST_TEXT`, 64 wide) whose last hidden states
  the UNet cross-attends to;
- a word-level tokenizer built offline from :data:`VOCABULARY` (captions ``"a photo of a {class}"``, the empty
  prompt for classifier-free guidance and a rare identifier ``sks`` that no caption uses: DreamBooth's);
- DDPM training (1000 steps, cosine schedule) and DDIM sampling with classifier-free guidance.

Images are ``(N, 1, 32, 32)``: Fashion-MNIST's 28x28 items padded by 2 pixels, in [-1, 1] for the model and in
[0, 1] from :meth:`TinyTextToImage.sample`; :func:`to_classifier` crops them back to 28x28 for the Fashion-MNIST ViT.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.state import read_verified_weights
from .tasks import min_snr_weights

CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
"""Fashion-MNIST's classes (label order) as the captions name them."""

IDENTIFIER = "sks"
"""DreamBooth's rare identifier: in the vocabulary, in no pretraining caption."""

SPECIAL_TOKENS = ("<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>")
VOCABULARY = (
    SPECIAL_TOKENS
    + ("a", "photo", "of", IDENTIFIER)
    + tuple(dict.fromkeys(word for name in CLASS_NAMES for word in name.split()))
)
"""Every token: the specials, the caption words, the identifier and the class names' words (ids in this order)."""

MAX_LENGTH = 12
"""Tokens per prompt (start, up to 10 words, end; padded)."""

FMNIST_UNET = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
"""The UNet: every attention projection is 64 wide (DiffuseKronA's official a1=64, a2=8 divide them all)."""

FMNIST_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_LENGTH,
    "projection_dim": 64,
}
"""The text encoder (``CLIPTextConfig`` fields; the vocabulary and special ids come from :data:`VOCABULARY`)."""

NUM_TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"

FMNIST_DIFFUSION_FILE = Path(__file__).resolve().parent / "pretrained" / "fmnist_unet.safetensors"
"""The committed weights: ``unet.*`` and ``text_encoder.*`` (fp32)."""

FMNIST_DIFFUSION_SHA256 = "a81410b6c2d01016c51a2923ad6c9a8cc9e86b1fe43aa791ba848afd6bc0701d"
"""sha256 of :data:`FMNIST_DIFFUSION_FILE`, checked before every load."""

FMNIST_GUIDANCE = 1.5
"""The classifier-free guidance scale the committed model samples at by default (:meth:`TinyTextToImage.sample`,
the diffusion demo): of the scales the pretraining recipe's ``--export`` compares, the one under which the
Fashion-MNIST ViT recognises the most class-prompt samples (``pretrained/fmnist_unet.json``, ``metrics``)."""


def caption(name: str, identifier: str | None = None) -> str:
    """``"a photo of a {name}"``, or ``"a photo of a {identifier} {name}"`` (DreamBooth's instance prompt)."""
    return f"a photo of a {identifier} {name}" if identifier else f"a photo of a {name}"


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :data:`VOCABULARY`, built offline (lower-cases, splits on
    whitespace, wraps each prompt in start/end tokens, pads to :data:`MAX_LENGTH`)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(VOCABULARY)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token="<pad>", unk_token="<unk>",
        model_max_length=MAX_LENGTH,
    )  # fmt: skip


def build_text_encoder() -> nn.Module:
    """The CLIP-style text encoder with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = {token: VOCABULARY.index(token) for token in SPECIAL_TOKENS}
    config = CLIPTextConfig(
        vocab_size=len(VOCABULARY), pad_token_id=ids["<pad>"], bos_token_id=ids["<|startoftext|>"],
        eos_token_id=ids["<|endoftext|>"], **FMNIST_TEXT,
    )  # fmt: skip
    return CLIPTextModel(config)


class TinyTextToImage(nn.Module):
    """The UNet, the text encoder and the tokenizer, with DDPM training and DDIM sampling.

    Only ``unet`` is adapted when personalising (the text encoder stays frozen, as in DreamBooth-LoRA); both are
    trained in pretraining.
    """

    def __init__(self) -> None:
        super().__init__()
        from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

        self.unet = UNet2DConditionModel(**FMNIST_UNET)
        self.text_encoder = build_text_encoder()
        self.tokenizer = build_tokenizer()
        kwargs = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_schedule": BETA_SCHEDULE}
        self.noise_scheduler = DDPMScheduler(**kwargs, prediction_type="epsilon")
        self.sampler = DDIMScheduler(**kwargs, prediction_type="epsilon", clip_sample=True)

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Text embeddings ``(N, MAX_LENGTH, 64)`` of the prompts."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                return_tensors="pt")  # fmt: skip
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        ).last_hidden_state

    def loss(
        self, images: Tensor, prompts: Sequence[str], generator: torch.Generator, snr_gamma: float | None = 5.0,
        embeds: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Per-image ε-prediction MSE ``(N,)`` of ``images`` in [-1, 1] at random timesteps, Min-SNR-γ weighted.

        ``embeds``: precomputed text embeddings of ``prompts`` (a frozen text encoder's).
        """
        noise = torch.randn(images.shape, generator=generator)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(images),), generator=generator)
        noisy = self.noise_scheduler.add_noise(images, noise, timesteps)
        embeds = self.encode(prompts) if embeds is None else embeds
        pred = self.unet(noisy, timesteps, encoder_hidden_states=embeds).sample
        per_image = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if snr_gamma is not None:
            per_image = per_image * min_snr_weights(self.noise_scheduler, timesteps, snr_gamma)
        return per_image

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seed: int, steps: int = 20, guidance: float = FMNIST_GUIDANCE) -> Tensor:
        """Images ``(N, 1, 32, 32)`` in [0, 1] for ``prompts``: DDIM (η = 0) with classifier-free guidance from
        the empty prompt; the noise of image ``i`` comes from ``seed`` (the same prompts and seed give the same
        images)."""
        n = len(prompts)
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn((n, 1, 32, 32), generator=generator)
        cond = torch.cat([self.encode(list(prompts)), self.encode([""] * n)]) if guidance != 1.0 else None
        cond = self.encode(list(prompts)) if cond is None else cond
        self.sampler.set_timesteps(steps)
        for t in self.sampler.timesteps:
            if guidance != 1.0:
                eps, uncond = self.unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample.chunk(2)
                eps = uncond + guidance * (eps - uncond)
            else:
                eps = self.unet(x, t, encoder_hidden_states=cond).sample
            x = self.sampler.step(eps, t, x).prev_sample
        return ((x.clamp(-1, 1) + 1) / 2).float()


FMNIST_ENCODER_FILE = Path(__file__).resolve().parent / "pretrained" / "fmnist_ssl_encoder.safetensors"
"""The committed self-supervised Fashion-MNIST encoder (:func:`fmnist_subject_encoder`)."""

FMNIST_ENCODER_SHA256 = "c0aaf80a2b075341492048b038d5cd852b9518286504f00a9bd6ad68440fb540"
"""sha256 of :data:`FMNIST_ENCODER_FILE`, checked before every load."""


class SubjectEncoder(nn.Module):
    """A small self-supervised image encoder for subject fidelity: DreamBooth's DINO metric needs features that
    tell one item from another of its class, which a classifier's features do not (they are trained to forget it).

    Four 3x3 conv-BatchNorm-ReLU stages (widths ``widths``, the last three with stride 2: 32 -> 16 -> 8 -> 4 pixels),
    global average pooling: ``(N, widths[-1])`` features of ``(N, 1, 32, 32)`` images in [0, 1] (normalised inside
    with mean 0.5, std 0.5). ``recipes/diffusion/pretrain_fmnist_ssl.py`` trains it by instance discrimination
    (SimCLR's NT-Xent; Chen et al., ICML 2020) on Fashion-MNIST's training images, with a projection head that is
    dropped afterwards, as DINO's and SimCLR's features are read before their heads.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.dim = channels

    def forward(self, images: Tensor) -> Tensor:
        return self.features((images - 0.5) / 0.5).mean(dim=(2, 3))


def fmnist_subject_encoder(pretrained: bool = True, checkpoint_path: str | Path | None = None) -> SubjectEncoder:
    """The self-supervised Fashion-MNIST :class:`SubjectEncoder` with the committed weights (sha256-checked), frozen,
    in eval mode.

    Raises:
        FileNotFoundError: the weights file is missing.
        ValueError: its sha256 differs from :data:`FMNIST_ENCODER_SHA256`.
    """
    model = SubjectEncoder()
    if pretrained:
        state = read_verified_weights(
            checkpoint_path if checkpoint_path is not None else FMNIST_ENCODER_FILE,
            FMNIST_ENCODER_SHA256,
            "fmnist_subject_encoder",
            "it ships with modalpeft (modalpeft/diffusion/pretrained/, see fmnist_ssl_encoder.md): reinstall or "
            "restore it, or pass pretrained=False.",
        )
        model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def to_model(images: Tensor) -> Tensor:
    """Fashion-MNIST uint8 ``(N, 28, 28)`` -> the model's ``(N, 1, 32, 32)`` in [-1, 1] (padded with background)."""
    x = images.float().div(255).unsqueeze(1) * 2 - 1
    return F.pad(x, (2, 2, 2, 2), value=-1.0)


def to_classifier(images: Tensor) -> Tensor:
    """Samples ``(N, 1, 32, 32)`` in [0, 1] -> the Fashion-MNIST ViT's input ``(N, 1, 28, 28)`` (normalised with
    mean 0.5, std 0.5, as it was trained)."""
    return (images[..., 2:30, 2:30] - 0.5) / 0.5


def fmnist_diffusion(pretrained: bool = True, checkpoint_path: str | Path | None = None) -> TinyTextToImage:
    """The Fashion-MNIST text-to-image model, with the committed weights (sha256-checked), in eval mode.

    Raises:
        FileNotFoundError: the weights file is missing.
        ValueError: its sha256 differs from :data:`FMNIST_DIFFUSION_SHA256`.
    """
    model = TinyTextToImage()
    if pretrained:
        state = read_verified_weights(
            checkpoint_path if checkpoint_path is not None else FMNIST_DIFFUSION_FILE,
            FMNIST_DIFFUSION_SHA256,
            "fmnist_diffusion",
            "it ships with modalpeft (modalpeft/diffusion/pretrained/, see its README.md): reinstall or restore it, "
            "or pass pretrained=False.",
        )
        model.load_state_dict(state, strict=True)
    return model.eval()


__all__ = [
    "CLASS_NAMES", "FMNIST_DIFFUSION_FILE", "FMNIST_DIFFUSION_SHA256", "FMNIST_ENCODER_FILE", "FMNIST_ENCODER_SHA256",
    "FMNIST_GUIDANCE", "FMNIST_TEXT", "FMNIST_UNET", "IDENTIFIER", "SubjectEncoder", "TinyTextToImage", "VOCABULARY",
    "build_tokenizer", "caption", "fmnist_diffusion", "fmnist_subject_encoder", "to_classifier", "to_model",
]  # fmt: skip
